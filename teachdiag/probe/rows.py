"""A tokens.csv row from the numbers every instrument measures, the one definition of `finite`, and
the columns that say which token a row is.

    from teachdiag.probe.rows import make_row, label_rows, MEASURED
    row = make_row(before, fkl_after, rkl_after, grad_norm, gain_first_order, finite=True)
    label_rows(rows, ctx, positions, tokenizer.decode, instrument="checkpoint")

before: the signals at θ0 (probe/signals.py), floats in nats. Rows with finite = 0 are skipped
by every statistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MEASURED = ("fkl_after", "rkl_after", "gain_fkl", "gain_rkl", "rel_gain_fkl", "rel_gain_rkl")


def make_row(before: dict[str, float], fkl_after: float, rkl_after: float, grad_norm: float,
             gain_first_order: float, finite: bool) -> dict[str, float]:
    """Signals before, KLs after, gains (absolute and relative to before), ‖g‖, lr·⟨g, d⟩, finite flag.

    finite: the caller's checks of its logits (before, after, teacher); the row is finite when
    those passed and ‖g‖ and every signal before the step are finite. NaN afters (linear mode:
    no step) leave the measured columns NaN without clearing the flag."""
    row = dict(before)
    row["fkl_after"], row["rkl_after"] = fkl_after, rkl_after
    row["gain_fkl"] = row["fkl"] - fkl_after
    row["gain_rkl"] = row["rkl"] - rkl_after
    row["rel_gain_fkl"] = row["gain_fkl"] / row["fkl"] if row["fkl"] != 0 else math.nan
    row["rel_gain_rkl"] = row["gain_rkl"] / row["rkl"] if row["rkl"] != 0 else math.nan
    row["grad_norm"], row["gain_first_order"] = grad_norm, gain_first_order
    ok = bool(finite) and math.isfinite(grad_norm) and all(math.isfinite(v) for v in before.values())
    row["finite"] = int(ok)
    return row


def label_rows(rows: list[dict], ctx, positions: list[int], decode: Callable[[list[int]], str],
               instrument: str) -> list[dict]:
    """Add to each of one context's rows what identifies it in tokens.csv: context_id, position,
    token_id, token (the id decoded alone), response_length and instrument. ctx: a contexts.Context;
    rows[i] is the row of response position positions[i]. Returns rows, updated in place."""
    for j, row in zip(positions, rows):
        tok = ctx.response_ids[j]
        row.update(context_id=ctx.id, position=j, token_id=tok, token=decode([tok]),
                   response_length=len(ctx.response_ids), instrument=instrument)
    return rows
