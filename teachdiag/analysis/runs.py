"""Reading runs for analysis: a probe's tokens.csv (checked against its column contract), a run
folder with its record, a viability run, or a released TA-OPD token bank. No torch.

    from teachdiag.analysis.runs import load_tokens, load_run, describe
    df, n_dropped = load_tokens("runs/r1/tokens.csv")   # checks columns, drops finite == 0 rows
    run = load_run("runs/r1")                            # {"name", "table", "record", "n_rows", ...}
    describe(run)                                        # one line: pair, instrument, positions
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd

import teachdiag.analysis.report as report
import teachdiag.analysis.selection as selection
from teachdiag.analysis.bank import is_bank, read_bank
from teachdiag.errors import InputError
from teachdiag.scores import teachability_scores
from teachdiag.table import COLUMNS, TEXT_COLUMNS, PARTIAL, all_parts, line_of_row, read_tokens, row_parts

# absent from older tables, left absent: response_length, instrument (0.2); the probability mass
# dropped by a pair whose tokenizers differ in added/special ids (tokenizers.py)
MAY_LACK = ("response_length", "instrument", "student_dropped_mass", "teacher_dropped_mass")
# numeric columns every table has (the MAY_LACK ones are checked on their own)
NUMERIC = [c for c in COLUMNS if c not in TEXT_COLUMNS and c not in MAY_LACK]
OPTIONAL = ("gain_first_order",)  # added in 0.2; tables written before it still load (as NaN)
# written by newer probes; optional when loading. response_length (int, the context's full response
# length after truncation) is required by --protocol paper only (pos_norm); instrument is text:
# per_position, shared or checkpoint (DESIGN "Three instruments for the gain"), shown in the run description.
EXTRA = ("response_length", "instrument")
DECILE_SCORES = ["fkl", "union_fkl", "topk_entropy", "tip", "teach_entropy", "incompat",
                 "teachability"]
CONTRASTS = [("teachability", "fkl"), ("teachability", "incompat"), ("teach_entropy", "tip")]


# ---------------------------------------------------------------- loading

def load_tokens(path: str | pathlib.Path) -> tuple[pd.DataFrame, int]:
    """Read and check a tokens CSV (.csv or .csv.gz). Returns (finite rows in table order,
    number of rows excluded because `finite` is 0). Raises InputError naming the file and field."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    try:
        # as the probe writes it: ids and tokens are text ("NA" is a token), floats round-trip
        df = read_tokens(path)
    except pd.errors.EmptyDataError:
        raise InputError("file is empty", file=str(path)) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read CSV: {e}", file=str(path)) from None
    for col in COLUMNS:
        if col not in df.columns and col in OPTIONAL:
            df[col] = np.nan
        elif col not in df.columns and col not in MAY_LACK:
            raise InputError("missing column", file=str(path), field=col)
    if df.empty:
        raise InputError("no rows", file=str(path))
    numeric = NUMERIC + [c for c in MAY_LACK if c in df.columns and c not in TEXT_COLUMNS]
    if "instrument" in df.columns:
        df["instrument"] = df["instrument"].astype(str)
    if "response_length" in df.columns and df["response_length"].dtype == object:
        df["response_length"] = df["response_length"].replace({"": np.nan})  # read as text: no na_values
    for col in numeric:
        if df[col].dtype == bool:
            df[col] = df[col].astype(int)
        if not pd.api.types.is_numeric_dtype(df[col]):
            num = pd.to_numeric(df[col].replace({"True": 1, "False": 0, "true": 1, "false": 0}),
                                errors="coerce")
            bad = num.isna() & df[col].notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(f"not a number: {df[col].iloc[i]!r}", file=str(path),
                                 line=line_of_row(path, i), field=col)
            df[col] = num
    # the flag's definition (probe/rows.make_row): no ±inf in a finite row; a table that says
    # otherwise would have such rows dropped by every statistic but not counted as excluded
    infinite = np.isinf(df[[c for c in numeric if c != "finite"]].to_numpy(float)).any(axis=1)
    finite = (df["finite"].fillna(0).to_numpy() != 0) & ~infinite
    df = df[finite]
    if df.empty:
        raise InputError("no finite rows (every row has finite = 0)", file=str(path), field="finite")
    return selection.table_order(df), int((~finite).sum())


def load_run(run: str | pathlib.Path, allow_partial: bool = False) -> dict:
    """Load one run (folder or CSV path). Returns a dict: name, path, table, n_rows, n_excluded,
    n_contexts, complete, top_k, options. A run.json with complete: false is refused unless
    allow_partial; a missing run.json is allowed (completeness reported as unknown). With
    allow_partial, a folder with only tokens.partial.csv is read, teachability and incompat
    normalised over the rows present."""
    run = pathlib.Path(run)
    if is_bank(run):  # the released TA-OPD code's per-token export (bank.py)
        return _load_bank(run)
    if run.is_dir():
        # an interrupted probe leaves only tokens.partial.csv (teachability not yet normalised)
        csv = next((run / n for n in ("tokens.csv", "tokens.csv.gz") if (run / n).exists()), None)
        if csv is None:  # rank 0's part names the partial table even before rank 0 wrote a row
            partial = any(p.exists() for p, _ in all_parts(run))
            csv = run / (PARTIAL if partial else "tokens.csv")
        meta_path = run / "run.json"
    else:
        csv, meta_path = run, run.parent / "run.json"
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e.msg}", file=str(meta_path), line=e.lineno) from None
        if meta.get("complete") is False and not allow_partial:
            raise InputError("run is incomplete (complete: false); pass --allow-partial to "
                             "analyze it anyway", file=str(meta_path), field="complete")
    if run.is_dir() and not csv.exists() and meta.get("complete") is False:
        # killed during its first context: run.json is written, no row yet (runtable.RunWriter.start)
        raise InputError("no finished context yet: the run has written no rows (resume it with --resume)",
                         file=str(run))
    if csv.name.startswith("tokens.partial") and not allow_partial:
        raise InputError("run is incomplete (no tokens.csv yet); pass --allow-partial to analyze "
                         "it anyway", file=str(csv))
    if csv.name == PARTIAL:  # an interrupted torchrun run: every rank's part, not just rank 0's
        loaded = [load_tokens(p) for p in row_parts(csv.parent)]
        if not loaded:
            raise InputError("no finished contexts yet", file=str(csv))
        table, excluded = pd.concat([t for t, _ in loaded], ignore_index=True), sum(e for _, e in loaded)
    else:
        table, excluded = load_tokens(csv)
    if table[["teachability", "incompat"]].isna().all().all():
        # the probe normalises these when it finishes; for a partial run, over the rows present
        teach, incompat = teachability_scores(table["union_fkl"], table["compat_mass"])
        table = table.assign(teachability=teach, incompat=incompat)
    name = report.run_label(run.name if run.is_dir() else run.name.split(".")[0], meta.get("options"))
    return {"name": name, "path": str(run), "table": table, "n_rows": len(table) + excluded,
            "n_excluded": excluded, "n_contexts": int(table["context_id"].nunique()),
            "complete": meta.get("complete", "unknown (no run.json)"),
            "top_k": meta.get("top_k"), "options": meta.get("options", {}), "step": meta.get("step", {})}


def _load_bank(path: pathlib.Path) -> dict:
    """load_run's dict for a TA-OPD token bank; `bank` holds what it has and lacks."""
    table, info = read_bank(path)
    finite = table["finite"].to_numpy() != 0
    if not finite.any():
        raise InputError("no row with finite Hs_topk_norm, KLf_union, Cmass and gain", file=str(path))
    table = selection.table_order(table[finite])
    teach, incompat = teachability_scores(table["union_fkl"], table["compat_mass"])
    table = table.assign(teachability=teach, incompat=incompat)
    name = path.name if path.is_dir() else path.name.split(".")[0]
    return {"name": name, "path": str(path), "table": table, "n_rows": int(len(finite)),
            "n_excluded": int((~finite).sum()), "n_contexts": int(table["context_id"].nunique()),
            "complete": "unknown (a token bank)", "top_k": None, "options": {}, "step": {}, "bank": info}


def add_response_lengths(run: dict, contexts: str | pathlib.Path) -> dict:
    """For a table written before the probe recorded response_length: set it to len(response_ids)
    of each context in the contexts JSONL. Right only when the probe truncated nothing; the run's
    description says where the lengths came from. A table that has the column is left as it is."""
    if "response_length" in run["table"].columns:
        return run
    path = pathlib.Path(contexts)
    if not path.is_file():
        raise InputError("no such file", file=str(path), field="response_lengths")
    lengths = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                lengths[str(rec["id"])] = len(rec["response_ids"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"not a context record ({e})", file=str(path), line=i) from None
    ids = run["table"]["context_id"]
    missing = sorted(set(ids) - set(lengths))
    if missing:
        raise InputError(f"{len(missing)} context(s) of {run['path']} not in this file, e.g. "
                         f"{missing[0]!r}", file=str(path), field="id")
    table = run["table"].assign(response_length=ids.map(lengths).astype(float))
    return {**run, "table": table, "response_length_from": str(path)}


def describe(run: dict) -> str:
    """One line for a figure title: instrument, gain step rule and loss from run.json's options."""
    o, t = run.get("options") or {}, run["table"]
    inst = ", ".join(sorted(set(t["instrument"]))) if "instrument" in t.columns else "per_position"
    if inst == "checkpoint":
        return "checkpoint gain: θ0 → θτ (no step)"
    if "bank" in run:
        return "TA-OPD token bank: top-K signals, " + (", ".join(run["bank"]["gains"]) or "no gain")
    lr = (run.get("step") or {}).get("lr", o.get("lr"))  # the lr used: --lr auto records its choice there
    lr = f"lr {lr:g}" if isinstance(lr, (int, float)) else f"lr {lr}" if lr else "lr unknown"
    step = f"{o['optimizer']} step, {lr}" if "optimizer" in o else "step rule unknown"
    loss = f", {o['loss']} loss" if "loss" in o else ""
    return f"{inst.replace('_', '-')} gain: {step}{loss}"
