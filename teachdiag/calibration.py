"""The step-size sweep: the largest lr that still stays in the linear regime (measured gain ≈ the
first-order prediction lr·⟨g, d⟩). `teachdiag calibrate` and `probe --lr auto` both call it.

    from teachdiag.calibration import sweep, summarize, choose_lr, auto_lr
    table = sweep(teacher, student, ctxs, picks, [1e-4, 1e-3, 1e-2], vocab)   # one row per position × lr
    lr = choose_lr(summarize(table))                                          # or None: no lr in regime
    lr, summary = auto_lr(teacher, student, ctxs, vocab, loss="reverse_kl", optimizer="normalized",
                          params="all", seed=0, positions=64)

Each sampled position costs one forward + backward at θ0 and one forward per lr: the gradient is
computed once and reused for the whole grid (SingleStepProbe.position_gradient), and θ0 is
back bit for bit after every step (steps.stepped).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from teachdiag.contexts import Context, by_context, select_positions
from teachdiag.errors import InputError
from teachdiag.probe.exact import SingleStepProbe
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.signals import token_logprob
from teachdiag.probe.steps import RULES
from teachdiag.progress import progress

BAND = (0.9, 1.1)  # accepted median of gain / first-order prediction
MAX_NEGATIVE = 0.05  # accepted share of positions whose probe loss went up
RULE = (f"largest lr of the lowest run of consecutive in-regime lrs; in regime: median gain/first-order "
        f"in [{BAND[0]}, {BAND[1]}] and < {MAX_NEGATIVE:.0%} negative gains")
GAIN = {"reverse_kl": "gain_rkl: drop of KL(p_S || p_T)", "forward_kl": "gain_fkl: drop of KL(p_T || p_S)",
        "sampled_token": "drop of the surrogate -c*log p_S(y) with c = log p_T(y) - log p_S(y) frozen at θ0"}


def parse_lrs(text: str, optimizer: str) -> list[float]:
    """--lrs as a sorted list of distinct positive floats; '' gives the default grid."""
    if not text.strip():
        return [float(f"{RULES[optimizer].default_lr * s:.3g}") for s in np.logspace(-3, 3, 10)]
    try:
        lrs = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"must be comma-separated numbers, got {text!r}", field="--lrs") from None
    if not lrs:
        raise InputError("the lr grid is empty", field="--lrs")
    bad = [v for v in lrs if not (math.isfinite(v) and v > 0)]
    if bad:
        raise InputError(f"every lr must be a positive finite number, got {bad[0]}", field="--lrs")
    return sorted(set(lrs))


# ---------------------------------------------------------------------------- the sweep

def sweep(teacher, student, ctxs: list[Context], picks: list[tuple[int, int]], lrs: list[float], vocab: int,
          loss: str = "reverse_kl", optimizer: str = "normalized", params: str = "all", device="cpu",
          quiet: bool = True, top_k: int = 16, keep: torch.Tensor | None = None) -> pd.DataFrame:
    """One row per position × lr: context_id, position, lr, gain, gain_first_order, ratio, gain_fkl,
    gain_rkl, grad_norm, finite. gain is the measured drop of the probe loss (nats, see GAIN);
    ratio = gain / gain_first_order. The student is at θ0, bit for bit, on return.
    keep: None, or bool (vocab,): the ids both tokenizers agree on (probe/signals.py)."""
    probe = SingleStepProbe(student, params, loss, optimizer, lrs[0], vocab, top_k, keep=keep)
    by_ctx = by_context(picks)
    rows = []
    bar = progress(len(picks) * len(lrs), "calibrate", "step", quiet)
    try:
        for c, positions in by_ctx.items():
            ctx = ctxs[c]
            t_logits = teacher_logits(teacher, ctx, positions, vocab, device)  # (P, V)
            ids = torch.tensor(ctx.prompt_ids + ctx.response_ids, device=device)
            for i, j in enumerate(positions):
                pg = probe.position_gradient(ids[: len(ctx.prompt_ids) + j], t_logits[i], ctx.response_ids[j])
                for lr in lrs:
                    s_after = probe.stepped_logits(pg, lr)  # (1, V)
                    r = probe.row(pg, s_after, lr)
                    if loss == "sampled_token":  # the surrogate is linear in log p_S(y) with c frozen
                        lp_after = token_logprob(s_after, pg.token, keep)[0].item()
                        c_coef = pg.before["teacher_logprob"] - pg.before["student_logprob"]
                        gain = c_coef * (lp_after - pg.before["student_logprob"])
                    else:
                        gain = r["gain_rkl" if loss == "reverse_kl" else "gain_fkl"]
                    first = r["gain_first_order"]
                    rows.append({"context_id": ctx.id, "position": j, "lr": lr, "gain": gain,
                                 "gain_first_order": first, "ratio": gain / first if first != 0 else math.nan,
                                 "gain_fkl": r["gain_fkl"], "gain_rkl": r["gain_rkl"],
                                 "grad_norm": r["grad_norm"], "finite": r["finite"]})
                    bar.update()
                del pg  # one gradient copy alive at a time
    finally:
        bar.close()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the rule

def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per lr, over finite rows with a ratio: n, median and quartiles of the ratio, share of negative
    gains, median gain (nats). An lr with no such row keeps n = 0 and NaNs (never in regime)."""
    ok = table[(table["finite"] == 1) & np.isfinite(table["ratio"])]
    g = ok.groupby("lr")
    out = pd.DataFrame({"n": g.size(), "median_ratio": g["ratio"].median(),
                        "q25_ratio": g["ratio"].quantile(0.25), "q75_ratio": g["ratio"].quantile(0.75),
                        "share_negative": g["gain"].apply(lambda s: (s < 0).mean()),
                        "median_gain": g["gain"].median()})
    out = out.reindex(sorted(table["lr"].unique())).rename_axis("lr").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    out["in_regime"] = in_regime(out)
    return out


def in_regime(summary: pd.DataFrame, band: tuple[float, float] = BAND,
              max_negative: float = MAX_NEGATIVE) -> pd.Series:
    """True where median ratio ∈ band and share of negative gains < max_negative (NaN: False)."""
    return ((summary["n"] > 0) & summary["median_ratio"].between(*band)
            & (summary["share_negative"] < max_negative))


def choose_lr(summary: pd.DataFrame, band: tuple[float, float] = BAND,
              max_negative: float = MAX_NEGATIVE) -> float | None:
    """The largest lr of the lowest run of consecutive in-regime lrs in the grid, or None.

    Why a run and not "every smaller lr in regime": the smallest lrs can fail for precision, not
    curvature. In float32 most entries of θ0 − lr·d round back to θ0 when lr·d is under half an
    ulp (normalized, lr 1e-5 on 135M params: 98% unchanged, ratio 0.92), and tiny gains sink
    under the rounding of the logits. Above the first failure no lr is chosen, even if an
    overshoot lands back near ratio 1 by chance.
    """
    s = summary.sort_values("lr")
    ok = in_regime(s, band, max_negative).to_numpy()
    if not ok.any():
        return None
    start = int(np.argmax(ok))
    end = start
    while end + 1 < len(ok) and ok[end + 1]:
        end += 1
    return float(s["lr"].iloc[end])


def auto_lr(teacher, student, ctxs: list[Context], vocab: int, *, loss: str, optimizer: str, params: str,
            seed: int, positions: int = 64, lrs: list[float] | None = None, device="cpu",
            quiet: bool = True, keep: torch.Tensor | None = None) -> tuple[float, pd.DataFrame]:
    """(chosen lr, per-lr summary) on a seeded sample of positions (default grid unless `lrs`), for
    `probe --lr auto`. Raises InputError when no lr of the grid is in the linear regime."""
    picks = select_positions(ctxs, positions, seed)
    table = sweep(teacher, student, ctxs, picks, lrs or parse_lrs("", optimizer), vocab, loss, optimizer,
                  params, device, quiet, keep=keep)
    summary = summarize(table)
    lr = choose_lr(summary)
    if lr is None:
        raise InputError(f"no lr in the linear regime ({RULE}); run `teachdiag calibrate`", field="--lr")
    return lr, summary


