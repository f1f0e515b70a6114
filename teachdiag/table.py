"""The table: tokens.csv's columns, the run-level scores (teachability, incompat), exact CSV I/O.

    from teachdiag.table import COLUMNS, read_tokens, quantile_normalize, teachability_scores
    df = read_tokens("runs/r1/tokens.csv")          # float64 round-trip, tokens kept as text
    teach, incompat = teachability_scores(df["union_fkl"], df["compat_mass"])
    w = position_weight(df["position"], df["response_length"])   # PW-OPSD's w_t, in (0.25, 1)

No torch here: the analysis reads tables through this module on a laptop. The run folder that
writes them crash-safely is runfolder.py.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit


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


def quantile_normalize(x: np.ndarray) -> np.ndarray:
    """clip((x − q05) / (q95 − q05), 0, 1) over finite values; 0 where q95 == q05 (DESIGN §3)."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.full_like(x, np.nan)
    if not finite.any():
        return out
    q05, q95 = np.quantile(x[finite], [0.05, 0.95])
    out[finite] = 0.0 if q95 == q05 else np.clip((x[finite] - q05) / (q95 - q05), 0.0, 1.0)
    return out


def teachability_scores(union_fkl: np.ndarray, compat_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teachability, incompat) = (D̃·C̃, D̃·(1 − C̃)), normalised over all rows of one run."""
    d, c = quantile_normalize(union_fkl), quantile_normalize(compat_mass)
    return d * c, d * (1.0 - c)


def soft_or(a, b):
    """a + b − a·b: the soft OR of two scores in [0, 1] (TIP = H̃ ∨ D̃, teachability + entropy = H̃ ∨ T̃)."""
    return a + b - a * b


def peer_scores(topk_entropy, union_fkl, teachability) -> dict[str, np.ndarray]:
    """The peer selection scores, normalised over the rows given: entropy H̃, divergence D̃,
    tip H̃ ∨ D̃ and teach_entropy H̃ ∨ T̃ (T = teachability). The analysis (over a run) and the
    trainer's selectors (over a rollout batch) both use these."""
    h, d, t = (quantile_normalize(x) for x in (topk_entropy, union_fkl, teachability))
    return {"entropy": h, "divergence": d, "tip": soft_or(h, d), "teach_entropy": soft_or(h, t)}


def position_weight(position, response_length, w_min: float = 0.25, tau: float = 0.30,
                    scale: float = 0.10) -> np.ndarray:
    """PW-OPSD's weight of 0-based position t in a response of L tokens (arXiv 2605.21606, the
    "moderate" schedule by default): w_min + (1 − w_min)·σ((frac − tau) / max(scale, 1e-6)),
    frac = (t + 0.5)/L, the midpoint of the token's share of its own response (the paper's code
    indexes from 1 and subtracts 0.5). L is that response's length, never a padded batch length.
    Increasing in t for w_min < 1: early tokens, where the student picks its path, count less
    than the late ones that carry it out. Arrays broadcast; float64 out."""
    frac = (np.asarray(position, dtype=np.float64) + 0.5) / np.asarray(response_length, dtype=np.float64)
    return w_min + (1.0 - w_min) * expit((frac - tau) / max(scale, 1e-6))  # expit: no overflow at scale → 0


def pos_norm(position, response_length) -> np.ndarray:
    """Relative position j/(T − 1) of 0-based position j in a response of T tokens (0 = first
    token, 1 = last; a one-token response gives 0). The paper protocol's pos_norm and the
    viability table's, one definition. Arrays broadcast; float64 out."""
    j = np.asarray(position, dtype=np.float64)
    return j / np.maximum(np.asarray(response_length, dtype=np.float64) - 1.0, 1.0)


def budget_count(n: int, rho: float) -> int:
    """round(ρ·n) positions, the paper's budget rule (halves to even, as Python's round), at most n.
    ρ·n is rounded to 9 decimals first, so float noise (0.07 · 150 = 10.500000000000002) cannot move
    it across a half. The paper protocol's selection and the trainer's selectors both use this
    (the default protocol keeps its own ceil(ρ·n), analysis/selection.budget_size)."""
    if not 0 < rho <= 1:
        raise ValueError(f"budget must be in (0, 1], got {rho}")
    return min(n, int(round(round(rho * n, 9))))


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


