"""The released TA-OPD code's per-token bank export, read as a teachdiag table.

    teachdiag analyze path/to/token_bank/             # a folder of rollout_NNNNNN.csv / .jsonl
    teachdiag analyze path/to/token_bank/rollout_000003.jsonl
    from teachdiag.analysis.bank import is_bank, read_bank
    table, info = read_bank("token_bank/")            # tokens.csv's columns; info["predictors"]

That code (a fork of slime, rollout/tip_compat.py) can write one row per response token of each
rollout batch (schema_version 1): sample_index, tok_pos, resp_len, Hs_topk_norm, KLf_union,
Cmass (exact teacher mass on the student's top-K when Cmass_exact is 1, else the lower bound of
the teacher's own list; Cmass_true / Cmass_topk keep both), loss_mask_original, the batch-
normalised scores (H_norm, D_norm, C_norm, Dlearn, Dincompat, tip_score, ca_softor_score),
budget_keep, and, once a gain has been measured, a column such as G_KLf. Mapped to tokens.csv:

    context_id      rollout_id:sample_index (sample_index alone when rollout_id is empty)
    position        tok_pos                 response_length   resp_len
    token_id        token_id                token             "" (the bank has no text)
    topk_entropy    Hs_topk_norm            union_fkl         KLf_union (over the top-K lists)
    compat_mass     Cmass                   student/teacher_logprob   *_logp_sampled
    rel_gain_fkl    G_KLf (or rel_gain_fkl) gain_fkl          drop_fkl / gain_fkl, when present

The full-vocabulary fkl, rkl and entropies are not in a bank: those columns stay empty, and
every statistic that needs them reports too few rows. teachability and incompat are normalised
again over the whole table (the bank's Dlearn / Dincompat are per rollout batch). Rows with
loss_mask_original = 0 are left out (the trainer could not train on them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from teachdiag.errors import InputError
from teachdiag.table import COLUMNS, line_of_row

REQUIRED = ("sample_index", "tok_pos", "resp_len", "Hs_topk_norm", "KLf_union", "Cmass")
RENAME = {"tok_pos": "position", "resp_len": "response_length", "Hs_topk_norm": "topk_entropy",
          "KLf_union": "union_fkl", "Cmass": "compat_mass", "student_logp_sampled": "student_logprob",
          "teacher_logp_sampled": "teacher_logprob"}
GAINS = {"G_KLf": "rel_gain_fkl", "rel_gain_fkl": "rel_gain_fkl", "drop_fkl": "gain_fkl", "gain_fkl": "gain_fkl",
         "gain_rkl": "gain_rkl", "rel_gain_rkl": "rel_gain_rkl"}


def bank_files(path: Path) -> list[Path]:
    """The bank's rollout files: the file itself, or a folder's rollout_*.csv / rollout_*.jsonl."""
    if path.is_file():
        return [path]
    return sorted(path.glob("rollout_*.csv")) + sorted(path.glob("rollout_*.jsonl"))


def is_bank(path: str | Path) -> bool:
    """A bank export: a folder of rollout_*.csv/.jsonl without a tokens table, or one such file
    whose first record has the bank's columns."""
    p = Path(path)
    files = bank_files(p) if p.is_dir() and not (p / "tokens.csv").exists() else [p] if p.is_file() else []
    if not files or files[0].suffix not in (".csv", ".jsonl"):
        return False
    try:
        with open(files[0], encoding="utf-8") as f:
            first = f.readline()
        cols = json.loads(first).keys() if files[0].suffix == ".jsonl" else first.strip().split(",")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return all(c in cols for c in ("sample_index", "tok_pos", "KLf_union"))


def _read(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".jsonl":  # json, not pandas' reader: floats exactly as written
            with open(path, encoding="utf-8") as f:
                recs = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
            return pd.DataFrame([r for _, r in recs]).assign(_line=[n for n, _ in recs])
        return pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False, float_precision="round_trip")
    except (ValueError, RecursionError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read the bank file: {e}", file=str(path)) from None


def read_bank(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(table with tokens.csv's columns, info) from a bank export (module docstring). info: files,
    rows, rows_loss_masked, predictors (the signals present), missing (absent or empty), gains,
    cmass ("exact", "lower bound" or "mixed"). Raises InputError naming the file and column."""
    path = Path(path)
    files = bank_files(path)
    if not files:
        raise InputError("no rollout_*.csv or rollout_*.jsonl files", file=str(path))
    parts = []
    for f in files:
        df = _read(f)
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise InputError("not a TA-OPD token bank file (missing column)", file=str(f), field=missing[0])
        for c in (*REQUIRED, "loss_mask_original", "Cmass_exact", *GAINS, "token_id", "student_logp_sampled",
                  "teacher_logp_sampled"):
            if c in df.columns:
                num = pd.to_numeric(df[c], errors="coerce")
                bad = num.isna() & df[c].notna() & (df[c].astype(str).str.strip() != "")
                if bad.any():  # the line the record starts on, blank lines and quoted newlines counted
                    i = int(np.flatnonzero(bad.to_numpy())[0])
                    line = int(df["_line"].iloc[i]) if "_line" in df.columns else line_of_row(f, i)
                    raise InputError(f"not a number: {df[c].iloc[i]!r}", file=str(f), line=line, field=c)
                df[c] = num
        parts.append(df.assign(_file=f.name))
    bank = pd.concat(parts, ignore_index=True)
    n_all = len(bank)
    if "loss_mask_original" in bank.columns:
        bank = bank[bank["loss_mask_original"].fillna(1) != 0]
    rid = bank["rollout_id"].astype(str) if "rollout_id" in bank.columns else pd.Series("", index=bank.index)
    rid = rid.where(~rid.isin(["", "nan", "None"]), bank["_file"].str.replace(r"^rollout_|\.\w+$", "", regex=True))
    table = pd.DataFrame({"context_id": rid + ":" + bank["sample_index"].astype("Int64").astype(str)})
    for src, dst in RENAME.items():
        table[dst] = bank[src].to_numpy(float) if src in bank.columns else np.nan
    table["token_id"] = bank["token_id"].to_numpy() if "token_id" in bank.columns else -1
    table["token"] = ""
    gains = {}
    for src, dst in GAINS.items():
        if src in bank.columns and dst not in gains.values() and bank[src].notna().any():
            table[dst], gains[src] = bank[src].to_numpy(float), dst
    for c in COLUMNS:
        if c not in table.columns:
            table[c] = "" if c == "instrument" else np.nan
    table["instrument"] = "bank"
    need = ["topk_entropy", "union_fkl", "compat_mass", *gains.values()]
    table["finite"] = np.isfinite(table[need].to_numpy(float)).all(axis=1).astype(int)
    exact = bank["Cmass_exact"].fillna(0).to_numpy() if "Cmass_exact" in bank.columns else np.zeros(len(bank))
    info = {"files": [f.name for f in files], "rows": n_all, "rows_loss_masked": n_all - len(bank),
            "predictors": [c for c in ("topk_entropy", "union_fkl", "compat_mass", "position", "student_logprob",
                                       "teacher_logprob") if table[c].notna().any()],
            "missing": [c for c in ("fkl", "rkl", "student_entropy", "teacher_entropy") if table[c].isna().all()],
            "gains": gains,
            "cmass": "exact" if len(exact) and exact.all() else "lower bound" if not exact.any() else "mixed"}
    if not gains:
        info["note"] = "no gain column (G_KLf, rel_gain_fkl, drop_fkl, gain_fkl): only the signals can be described"
    return table[COLUMNS].reset_index(drop=True), info


def describe_bank(info: dict) -> str:
    """One line for the analysis log and summary: what the bank has and lacks."""
    gains = ", ".join(f"{k} → {v}" for k, v in info["gains"].items()) or "none"
    return (f"TA-OPD token bank ({len(info['files'])} file(s), {info['rows']} rows, {info['rows_loss_masked']} "
            f"loss-masked left out; C {info['cmass']}); predictors: {', '.join(info['predictors'])}; "
            f"gains: {gains}; not in a bank: {', '.join(info['missing']) or 'nothing'}")

