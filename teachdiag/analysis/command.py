"""`teachdiag analyze`: statistics, tables and figures from probe runs, from the CSV alone (no torch).

    teachdiag analyze runs/r1 [--gain rel_gain_fkl] [--out runs/r1/analysis] [--bootstrap 1000] [--seed 0]
    teachdiag analyze runs/sgd runs/adam --out runs/compare        # several runs, side by side
    teachdiag analyze runs/v                # a `teachdiag viability` run: AUROC per predictor (viability.py)
    python -c "from teachdiag.analysis.command import *; run_analyze(AnalyzeConfig(runs=['runs/r1']))"

Writes to --out: correlations.csv, regressions.csv, q3.csv, selection.csv (each score's global top
ceil(ρN)), selection_ta_opd.csv (what the released TA-OPD rule keeps, batches of 8 contexts),
deciles.csv, summary.md, summary.tex, and figures/*.png + *.pdf. Every table has a `run` column.
A run is a folder holding tokens.csv (or tokens.csv.gz) and run.json, or a path to the CSV itself.
Rows whose `finite` flag is 0 are excluded from every statistic; their count is reported.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import pandas as pd

import teachdiag.analysis.plots as plots
import teachdiag.analysis.report as report
import teachdiag.analysis.selection as selection
import teachdiag.analysis.stats as analysis
from teachdiag.analysis.bank import describe_bank, is_bank, read_bank
from teachdiag.analysis.instruments import agreement
from teachdiag.analysis.options import AnalyzeConfig  # noqa: F401  (its home before; imported from here)
from teachdiag.analysis.trajectory import analyze_monitor, monitor_folder
from teachdiag.analysis.viability import analyze_viability, is_viability_run
from teachdiag.errors import InputError
from teachdiag.runfolder import check_writable
from teachdiag.scores import teachability_scores
from teachdiag.table import COLUMNS, TEXT_COLUMNS, PARTIAL, all_parts, line_of_row, read_tokens

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
        # killed during its first context: run.json is written, no row yet (runfolder.RunWriter.start)
        raise InputError("no finished context yet: the run has written no rows (resume it with --resume)",
                         file=str(run))
    if csv.name.startswith("tokens.partial") and not allow_partial:
        raise InputError("run is incomplete (no tokens.csv yet); pass --allow-partial to analyze "
                         "it anyway", file=str(csv))
    if csv.name == PARTIAL:  # an interrupted torchrun run: every rank's part, not just rank 0's
        loaded = [load_tokens(p) for p, _ in all_parts(csv.parent) if p.is_file() and p.stat().st_size > 0]
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


# ---------------------------------------------------------------- the command

def _log(msg: str) -> None:
    print(f"teachdiag analyze: {msg}", file=sys.stderr, flush=True)


def run_analyze(cfg: AnalyzeConfig) -> pathlib.Path:
    """Run every statistic of cfg.protocol on every run of cfg.runs and write the tables, summary
    and figures. Returns the output folder."""
    if not cfg.runs:
        raise InputError("give at least one run folder", field="runs")
    known = (*analysis.GAINS, "gain_first_order")
    if cfg.protocol not in ("teachdiag", "paper"):
        raise InputError(f"unknown protocol {cfg.protocol!r}; choose teachdiag or paper", field="protocol")
    if cfg.protocol == "teachdiag" and cfg.gain not in known:
        raise InputError(f"unknown gain {cfg.gain!r}; choose one of {', '.join(known)}", field="gain")
    if cfg.bootstrap < 0:
        raise InputError("must be >= 0", field="bootstrap")
    first = pathlib.Path(cfg.runs[0])
    out = pathlib.Path(cfg.out) if cfg.out else (first if first.is_dir() else first.parent) / "analysis"
    fig_dir = pathlib.Path(cfg.figures) if cfg.figures else out / "figures"
    if all(monitor_folder(r) for r in cfg.runs):  # a live monitor's steps (analysis/trajectory.py)
        return analyze_monitor(cfg.runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log)
    kinds = {is_viability_run(r) for r in cfg.runs}
    if kinds == {True}:  # `teachdiag viability` runs: AUROC of each predictor (analysis/viability.py)
        for flag, value, default in (("protocol", cfg.protocol, "teachdiag"), ("gain", cfg.gain, "rel_gain_fkl"),
                                     ("allow_partial", cfg.allow_partial, False),
                                     ("response_lengths", cfg.response_lengths, "")):
            if value != default:  # refused, not ignored: a viability run has no gains or protocols
                raise InputError("does not apply to a viability run (viability.csv)", field=f"--{flag.replace('_', '-')}")
        out.mkdir(parents=True, exist_ok=True)
        return analyze_viability(cfg.runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log)
    if len(kinds) > 1:
        raise InputError("give either probe runs (tokens.csv) or viability runs (viability.csv), not both",
                         field="runs")
    runs = [load_run(r, cfg.allow_partial) for r in cfg.runs]
    bank = next((r for r in runs if "bank" in r), None)
    if bank is not None and cfg.protocol == "paper":  # the paper's H, D are full-vocabulary; a bank has top-K lists
        raise InputError("a TA-OPD token bank has no full-vocabulary entropy or fkl, which the paper protocol "
                         "needs; analyze it with the default protocol", file=bank["path"], field="--protocol")
    check_writable(out)  # a read-only --out is refused now, not after every statistic is computed
    if cfg.response_lengths:
        runs = [add_response_lengths(r, cfg.response_lengths) for r in runs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder names: fall back to the paths given
        for r in runs:
            r["name"] = r["path"]
    for r in runs:
        r["title"] = describe(r)
        if "bank" in r:
            _log(f"{r['name']}: {describe_bank(r['bank'])}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.protocol == "paper":
        from teachdiag.analysis.paper_command import analyze_paper  # the paper's tables

        analyze_paper(runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log)
        return out
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in
                                             ("corr", "reg", "q3", "sel", "ta", "dec", "split")}
    scored = {}
    for r in runs:
        t0 = time.time()
        _log(f"{r['name']}: {r['n_rows']} rows, {r['n_excluded']} excluded as non-finite, "
             f"{r['n_contexts']} contexts; {cfg.bootstrap} cluster-bootstrap resamples")
        t = analysis.add_scores(r["table"], seed=cfg.seed)
        scored[r["name"]] = t
        # measured gains, and the first-order prediction where the run has it (--mode linear: only it)
        gains = [g for g in known if t[g].notna().any()]
        signals = [s for s in analysis.SIGNALS if t[s].notna().any()]
        if cfg.gain not in gains:
            hint = "; a --mode linear run has only gain_first_order" if "gain_first_order" in gains else ""
            raise InputError(f"this run has no {cfg.gain} values{hint}", file=r["path"], field="gain")
        parts = {
            # a signal with no value at all (fkl in a token bank) would empty every row set
            "corr": analysis.correlations(t, gains, signals, cfg.bootstrap, cfg.seed,
                                          [c for c in CONTRASTS if set(c) <= set(signals)], progress=True),
            "reg": analysis.regressions(t, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed),
            "q3": analysis.q3_gap(t, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed),
            "sel": selection.selection_table(t, cfg.gain),
            "ta": selection.ta_opd_selection(t, cfg.gain, seed=cfg.seed, n_boot=cfg.bootstrap),
            "dec": pd.concat([analysis.gain_by_bin(t, s, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed)
                              for s in DECILE_SCORES]),
            "split": analysis.gain_by_bin(t, "fkl", cfg.gain, split="compat_mass",
                                          n_boot=cfg.bootstrap, seed=cfg.seed),
        }
        for k, v in parts.items():
            tables[k].append(v.assign(run=r["name"])[["run", *v.columns]])
        _log(f"{r['name']}: statistics done in {time.time() - t0:.1f} s")
    corr, reg, q3, sel, ta, dec, split = (pd.concat(tables[k], ignore_index=True) for k in
                                          ("corr", "reg", "q3", "sel", "ta", "dec", "split"))
    for name, df in [("correlations", corr), ("regressions", reg), ("q3", q3),
                     ("selection", sel), ("selection_ta_opd", ta), ("deciles", dec)]:
        df.to_csv(out / f"{name}.csv", index=False)
    titles = {r["name"]: r["title"] for r in runs}
    figs = {
        "gain_vs_fkl": plots.gain_vs_fkl(scored, cfg.gain, seed=cfg.seed, titles=titles),
        "gain_by_decile": plots.gain_by_decile(dec, cfg.gain, titles=titles),
        "gain_vs_fkl_by_compat": plots.gain_vs_fkl_by_compat(split, cfg.gain, titles=titles),
        "selection_by_budget": plots.selection_bars(sel, cfg.gain, titles=titles),
        "std_coefficients": plots.coefficients(reg, titles=titles),
        "correlation_heatmap": plots.correlation_heatmap(corr, titles=titles),
    }
    if len(scored) > 1:  # several runs: how far their gains agree where they measured the same positions
        agreement(scored, cfg.gain, cfg.bootstrap, cfg.seed).to_csv(out / "instruments.csv", index=False)
    written = []
    for name, fig in figs.items():
        written += plots.save(fig, fig_dir, name)
    rel = [os.path.relpath(p, out) for p in written if p.suffix == ".png"]  # links work from out/
    report.write_summary(out, runs, corr, reg, q3, sel, cfg.gain, figures=rel, ta_opd=ta)
    _log(f"wrote {out} ({len(written)} figure files in {fig_dir})")
    return out
