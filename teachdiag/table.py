"""The table: tokens.csv's columns and exact CSV I/O.

    from teachdiag.table import COLUMNS, read_tokens, pos_norm
    df = read_tokens("runs/r1/tokens.csv")          # float64 round-trip, tokens kept as text
    pos_norm(df["position"], df["response_length"])  # j / (T − 1)
    line_of_row(path, 41)                            # the line a data row starts on, for error messages

No torch here: the analysis reads tables through this module on a laptop. The run folder that
writes them crash-safely is runtable.py (on runfolder.RunOutput); the run-level scores (teachability, incompat, the
selectors') are scores.py.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd


COLUMNS = ["context_id", "position", "token_id", "token", "fkl", "rkl", "student_entropy",
           "teacher_entropy", "student_logprob", "teacher_logprob", "compat_mass", "topk_entropy",
           "union_fkl", "teachability", "incompat", "fkl_after", "rkl_after", "gain_fkl", "gain_rkl",
           "rel_gain_fkl", "rel_gain_rkl", "grad_norm", "gain_first_order", "finite", "response_length",
           "instrument", "student_dropped_mass", "teacher_dropped_mass"]
TEXT_COLUMNS = ("context_id", "token", "instrument")
PARTIAL, PROGRESS, TOKENS, RUN = "tokens.partial.csv", "progress.jsonl", "tokens.csv", "run.json"
# viability.csv (`teachdiag viability`): one row per (position, alternative); the signals are
# tokens.csv's at the position, the labels say whether the forced branch reached the answer
VIABILITY = "viability.csv"
VIABILITY_COLUMNS = ["context_id", "position", "response_length", "pos_norm", "token_id", "token", "alt_rank",
                     "alt_id", "alt_token", "is_sampled", "teacher_prob", "student_prob", "fkl", "rkl",
                     "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob", "compat_mass",
                     "topk_entropy", "union_fkl", "student_dropped_mass", "teacher_dropped_mass", "teachability",
                     "incompat", "finite", "viable_greedy", "viable_sampled", "greedy_answer", "greedy_new_tokens",
                     "greedy_finish", "prefix_viable", "spine_correct"]
VIABILITY_TEXT_COLUMNS = ("context_id", "token", "alt_token", "greedy_answer", "greedy_finish")


def part_files(out: Path, rank: int) -> tuple[Path, Path]:
    """(rows, progress) files of one rank; rank 0 keeps the single-process names."""
    if rank == 0:
        return out / PARTIAL, out / PROGRESS
    return out / f"tokens.partial.rank{rank}.csv", out / f"progress.rank{rank}.jsonl"


def all_parts(out: Path) -> list[tuple[Path, Path]]:
    """Every rank's (rows, progress) files in the folder, rank 0 first; any world size."""
    ranks = {0} | {int(m.group(1)) for p in out.iterdir()
                   if (m := re.fullmatch(r"(?:progress|tokens\.partial)\.rank(\d+)\.(?:jsonl|csv)", p.name))}
    return [part_files(out, r) for r in sorted(ranks)]


def row_parts(out: Path) -> list[Path]:
    """Every rank's rows file that holds something (a killed run's partial table), rank 0 first."""
    return [p for p, _ in all_parts(out) if p.is_file() and p.stat().st_size > 0]


def pos_norm(position, response_length) -> np.ndarray:
    """Relative position j/(T − 1) of 0-based position j in a response of T tokens (0 = first
    token, 1 = last; a one-token response gives 0). The paper protocol's pos_norm and the
    viability table's, one definition. Arrays broadcast; float64 out."""
    j = np.asarray(position, dtype=np.float64)
    return j / np.maximum(np.asarray(response_length, dtype=np.float64) - 1.0, 1.0)


def rows_to_csv(rows: list[dict], header: bool, columns: list[str] = COLUMNS) -> str:
    """CSV text; floats as repr (shortest text that round-trips float64), tokens CSV-escaped.
    columns: tokens.csv's by default; viability.csv passes its own."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in rows:
        w.writerow([repr(float(r[c])) if isinstance(r.get(c), float) else r.get(c, "") for c in columns])
    return buf.getvalue()


def read_tokens(path: str | Path, columns: list[str] = COLUMNS,
                text_columns: tuple[str, ...] = TEXT_COLUMNS) -> pd.DataFrame:
    """Read a tokens CSV (or another table written by rows_to_csv) back exactly (float64
    round-trip, text columns kept as strings)."""
    return pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False,
                       na_values={c: ["nan", "NaN", ""] for c in columns if c not in text_columns},
                       float_precision="round_trip")


def line_of_row(path: Path, row: int) -> int:
    """The line of `path` where data row `row` (0-based, blank lines skipped as pandas does) begins:
    a quoted field may hold newlines (a context id, a token), so rows and lines differ."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        k, last = 0, reader.line_num
        for record in reader:
            if record:
                if k == row:
                    return last + 1
                k += 1
            last = reader.line_num
    return row + 2
