"""`teachdiag calibrate`: sweep the step size on a sample of positions and pick the largest lr
that still stays in the linear regime (measured gain ≈ first-order prediction lr·⟨g, d⟩).

    teachdiag calibrate --positions 24 --optimizer normalized --out calib/   # embedded pair, demo rollouts
    teachdiag calibrate --teacher T --student S --contexts r.jsonl --lrs 1e-5,1e-4,1e-3,1e-2
    python -c "from teachdiag.calibrate import *; run_calibrate(CalibrateConfig(positions='16'))"

Each sampled position costs one forward + backward at θ0 and one forward per lr: the gradient is
computed once and reused for the whole grid (SingleStepProbe.position_gradient), and θ0 is
copied back bit for bit after every step. Writes calibration.csv (one row per position × lr),
calibration.json (chosen lr, rule, per-lr summary) and calibration.png/.pdf to --out.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from teachdiag import __version__
from teachdiag.contexts import Context, by_context, parse_positions, select_positions
from teachdiag.errors import InputError
from teachdiag.config import (ContextOptions, DeviceOptions, PairOptions, StepOptions, check_positive,
                              fill_embedded)
from teachdiag.flags import opt
from teachdiag.models import load_inputs, load_models, resolve_device
from teachdiag.probe.exact import SingleStepProbe, parse_params
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.signals import keep_mask, token_logprob
from teachdiag.probe.steps import RULES
from teachdiag.progress import progress

BAND = (0.9, 1.1)  # accepted median of gain / first-order prediction
MAX_NEGATIVE = 0.05  # accepted share of positions whose probe loss went up
RULE = (f"largest lr of the lowest run of consecutive in-regime lrs; in regime: median gain/first-order "
        f"in [{BAND[0]}, {BAND[1]}] and < {MAX_NEGATIVE:.0%} negative gains")
GAIN = {"reverse_kl": "gain_rkl: drop of KL(p_S || p_T)", "forward_kl": "gain_fkl: drop of KL(p_T || p_S)",
        "sampled_token": "drop of the surrogate -c*log p_S(y) with c = log p_T(y) - log p_S(y) frozen at θ0"}


@dataclass
class CalibrateConfig(DeviceOptions, StepOptions, ContextOptions, PairOptions):  # listed last-shown first
    """Options of `teachdiag calibrate` (each field's help is its --help text; --lr is not used)."""

    out: str = opt("folder for calibration.csv, .json and .png (files are replaced)", "calib")
    lrs: str = opt("comma-separated step sizes, e.g. 1e-5,1e-4,1e-3 (empty: 10 log-spaced values from "
                   "1e-3x to 1e3x the step rule's default lr)", "")


CALIBRATE_POSITIONS = 64  # cost: N backward + N × len(lrs) forwards


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
        probe.restore()
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


# ---------------------------------------------------------------------------- the command

def run_calibrate(cfg: CalibrateConfig, argv: list[str] | None = None) -> tuple[Path, list[str]]:
    """Sweep, write the three files, return (out folder, summary lines). Raises InputError on bad
    input, and (after writing the files) when no lr of the grid is in the linear regime."""
    t0 = time.time()
    lrs = parse_lrs(cfg.lrs, cfg.optimizer)
    fill_embedded(cfg)
    cfg.positions = cfg.positions or str(CALIBRATE_POSITIONS)
    check_positive(top_k=cfg.top_k)
    parse_params(cfg.params)
    device = resolve_device(cfg.device)
    ctxs, _, match = load_inputs(cfg)
    vocab = match.vocab  # the longer tokenizer: every id of either is below it
    teacher, student = load_models(cfg, device, ctxs, vocab)
    picks = select_positions(ctxs, parse_positions(cfg.positions), cfg.seed)
    table = sweep(teacher, student, ctxs, picks, lrs, vocab, cfg.loss, cfg.optimizer, cfg.params, device,
                  cfg.quiet, cfg.top_k, keep=keep_mask(match.shared_ids, vocab, device))
    summary = summarize(table)
    lr = choose_lr(summary)

    from teachdiag.analysis import plots

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "calibration.csv", index=False, float_format="%.17g")
    record = {"teachdiag": __version__, "chosen_lr": lr, "rule": RULE, "band": list(BAND),
              "max_negative_share": MAX_NEGATIVE, "gain": GAIN[cfg.loss],
              "summary": json.loads(summary.to_json(orient="records")), "options": asdict(cfg),
              "teacher": cfg.teacher, "student": cfg.student, "seed": cfg.seed, "n_positions": len(picks),
              "command": " ".join(["teachdiag", "calibrate", *(argv if argv is not None else sys.argv[2:])]),
              "device": str(device), "wall_s": round(time.time() - t0, 3)}
    (out / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    title = f"{Path(cfg.student).name} ← {Path(cfg.teacher).name}: loss {cfg.loss}, step {cfg.optimizer}"
    plots.save(plots.calibration(summary, lr, title, band=BAND, max_negative=MAX_NEGATIVE), out, "calibration")

    lo, hi = summary.iloc[0], summary.iloc[-1]
    lines = [f"wrote {out / 'calibration.csv'}, calibration.json and calibration.png",
             f"{len(picks)} positions x {len(lrs)} lrs ({cfg.loss}, {cfg.optimizer}): median gain/first-order "
             f"{lo.median_ratio:.3f} at lr {lo.lr:.3g} ... {hi.median_ratio:.3f} at lr {hi.lr:.3g}"]
    if lr is None:
        raise InputError(f"no lr in the linear regime ({RULE}); see {out / 'calibration.csv'} and try "
                         "smaller --lrs or more --positions", field="--lrs")
    row = summary[summary["lr"] == lr].iloc[0]
    lines.append(f"chosen lr = {lr:.3g}: median ratio {row.median_ratio:.3f}, {row.share_negative:.1%} negative "
                 f"gains (largest lr in the linear regime, see calibration.json)")
    if lr == lrs[-1]:
        lines.append("note: that is the largest lr of the grid; the linear regime may go further (larger --lrs)")
    return out, lines
