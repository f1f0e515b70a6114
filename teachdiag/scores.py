"""Selection scores and budget rules, one definition each: what the trainer's mask (selectors.py),
the default analysis and the paper protocol all read. numpy only, so a laptop can use it.

    from teachdiag.scores import quantile_normalize, selector_scores, budget_count, keep_positions
    teach, incompat = teachability_scores(union_fkl, compat_mass)        # D̃·C̃, D̃·(1 − C̃)
    s = selector_scores(signals, "teachability")                         # (N,) float64, higher first
    keep = keep_positions(signals, "teachability", budget=0.05)          # the released TA-OPD rule

Every score is computed from a dict of per-position arrays ("signals"): topk_entropy (H),
union_fkl (D), compat_mass (C), fkl, and for some selectors position / response_length /
sample. x̃ is quantile_normalize over the rows given (a rollout batch for a trainer, a run for
the analysis). DESIGN.md, "The trainer and the selectors", states each rule and its source.
"""

from __future__ import annotations

import math
import random

import numpy as np
from scipy.special import expit

# q95 − q05 below this counts as a flat score (all 0): the released TA-OPD code's and the paper's
# analysis threshold. teachdiag's default analysis keeps its older exact-zero test (eps = 0).
FLAT_EPS = 1e-12

# selector -> what it ranks by (DESIGN "The trainer and the selectors"); "all" keeps everything
SELECTORS = ("all", "teachability", "entropy", "divergence", "tip", "ca_softor", "teach_entropy",
             "fkl", "random", "position")
BUDGET_RULES = ("released", "round", "ceil")
# who keeps which positions of a batch: the released TA-OPD code's rule (default), or the rule
# teachdiag ≤ 0.2 read from the paper's text (train runs and data/demo_heldout were made with it)
KEEP_RULES = ("released", "paper_text")


def quantile_normalize(x, eps: float = 0.0, nonfinite: float = np.nan, arithmetic: str = "numpy") -> np.ndarray:
    """clip((x − q05) / (q95 − q05), 0, 1) over the finite values of x, linear quantiles.
    0 everywhere when q95 − q05 is 0 or below eps (a flat score). Non-finite entries get
    `nonfinite` (NaN: left out of statistics; the released trainer code uses 0).
    arithmetic: "numpy" (np.quantile's default method) or "released" (the released TA-OPD code's
    own xs[lo]·(1 − f) + xs[hi]·f, which can differ from numpy's in the last bit: enough to
    reorder scores that a clip or a soft OR brings to 1). float64 out."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.full_like(x, nonfinite)
    if not finite.any():
        return out
    if arithmetic == "numpy":
        q05, q95 = np.quantile(x[finite], [0.05, 0.95])
    elif arithmetic == "released":
        q05, q95 = (_released_quantile(np.sort(x[finite]), q) for q in (0.05, 0.95))
    else:
        raise ValueError(f"arithmetic must be 'numpy' or 'released', got {arithmetic!r}")
    span = q95 - q05
    out[finite] = 0.0 if span <= 0 or span < eps else np.clip((x[finite] - q05) / span, 0.0, 1.0)
    return out


def _released_quantile(xs: np.ndarray, q: float) -> float:
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo]) if lo == hi else float(xs[lo]) * (1.0 - (pos - lo)) + float(xs[hi]) * (pos - lo)


# how a trainer's selector normalises (selector_scores): the released code's way, or teachdiag
# ≤ 0.2's (numpy quantiles, exact-zero flat test, NaN for a non-finite signal)
CONVENTIONS = {"released": dict(eps=FLAT_EPS, nonfinite=0.0, arithmetic="released"),
               "teachdiag": dict(eps=0.0, nonfinite=np.nan, arithmetic="numpy")}


def soft_or(a, b):
    """a + b − a·b: the soft OR of two scores in [0, 1] (TIP = H̃ ∨ D̃, teachability + entropy = H̃ ∨ T̃)."""
    return a + b - a * b


def teachability_scores(union_fkl, compat_mass, eps: float = 0.0,
                        nonfinite: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
    """(teachability, incompat) = (D̃·C̃, D̃·(1 − C̃)), normalised over the rows given."""
    d = quantile_normalize(union_fkl, eps, nonfinite)
    c = quantile_normalize(compat_mass, eps, nonfinite)
    return d * c, d * (1.0 - c)


def teachability_columns(union_fkl, compat_mass, finite) -> tuple[np.ndarray, np.ndarray]:
    """tokens.csv's teachability and incompat columns: teachability_scores normalised over the rows
    where `finite` ((N,) bool) holds, NaN on the others (runtable.RunWriter.finish, the monitor)."""
    finite = np.asarray(finite, dtype=bool)
    teach, incompat = np.full(len(finite), np.nan), np.full(len(finite), np.nan)
    teach[finite], incompat[finite] = teachability_scores(np.asarray(union_fkl)[finite],
                                                          np.asarray(compat_mass)[finite])
    return teach, incompat


def peer_scores(topk_entropy, union_fkl, teachability, eps: float = 0.0,
                nonfinite: float = np.nan) -> dict[str, np.ndarray]:
    """The analysis's peer scores over the rows given: entropy H̃, divergence D̃, tip H̃ ∨ D̃ and
    teach_entropy H̃ ∨ T̃ (T̃ = the teachability column normalised again)."""
    h, d, t = (quantile_normalize(x, eps, nonfinite) for x in (topk_entropy, union_fkl, teachability))
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


def selector_scores(signals: dict, selector: str, seed: int = 0, convention: str = "released") -> np.ndarray:
    """(N,) float64 score of each position for a trainer's selector, normalised over these N rows
    (a rollout batch), higher kept first; convention: CONVENTIONS (the released code's by default:
    its quantile arithmetic, flat below 1e-12, a non-finite signal normalises to 0).

    teachability D̃·C̃; entropy H̃; divergence D̃; tip H̃ ∨ D̃; ca_softor H̃ ∨ norm(D·C) (the
    released code's fill score); teach_entropy H̃ ∨ norm(D̃·C̃) (teachdiag's); fkl the raw
    full-vocabulary KL; position PW-OPSD's w_t (needs position and response_length); random
    uniform, seeded; all 1."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; one of {SELECTORS}")
    n = len(signals["fkl"] if "fkl" in signals else signals["topk_entropy"])
    if selector == "all":
        return np.ones(n)
    if selector == "random":
        return np.random.default_rng(seed).random(n)
    if selector == "fkl":
        return np.asarray(signals["fkl"], dtype=np.float64)
    if selector == "position":
        return position_weight(signals["position"], signals["response_length"])
    if selector == "ca_softor":
        return ca_softor(signals, convention)
    norm = lambda x: quantile_normalize(x, **CONVENTIONS[convention])  # noqa: E731
    h, d, c = norm(signals["topk_entropy"]), norm(signals["union_fkl"]), norm(signals["compat_mass"])
    return {"teachability": lambda: d * c, "entropy": lambda: h, "divergence": lambda: d,
            "tip": lambda: soft_or(h, d), "teach_entropy": lambda: soft_or(h, norm(d * c))}[selector]()


def ca_softor(signals: dict, convention: str = "released") -> np.ndarray:
    """H̃ ∨ norm(D·C): the released code's compatibility-aware soft OR, the score it fills a
    sample with. The product D·C is normalised, not the product of the normalised D̃ and C̃."""
    d, c = (np.asarray(signals[k], dtype=np.float64) for k in ("union_fkl", "compat_mass"))
    conv = CONVENTIONS[convention]
    return soft_or(quantile_normalize(signals["topk_entropy"], **conv), quantile_normalize(d * c, **conv))


def budget_count(n: int, rho: float, rule: str = "round") -> int:
    """How many of n positions a budget ρ in (0, 1] keeps.

    released: max(1, ceil(n·ρ)) exactly as the released TA-OPD code computes it, float noise
              included (100 · 0.07 = 7.000000000000001 keeps 8 there, and so here);
    round:    round(ρ·n), halves to even, the paper protocol's rule (0 when ρ·n < 0.5);
    ceil:     ceil(ρ·n), the default analysis's.
    round and ceil take ρ·n to 9 decimals first, so float noise cannot move them. At most n."""
    if not 0 < rho <= 1:
        raise ValueError(f"budget must be in (0, 1], got {rho}")
    if rule == "released":
        return min(n, max(1, math.ceil(n * rho))) if n else 0
    if rule == "round":
        return min(n, int(round(round(rho * n, 9))))
    if rule == "ceil":
        return min(n, math.ceil(round(rho * n, 9)))
    raise ValueError(f"unknown budget rule {rule!r}; one of {BUDGET_RULES}")


def best_first(score, position, candidates: np.ndarray) -> np.ndarray:
    """candidates (indices) sorted as the released code sorts them: score descending, then the
    earlier position within its response, then the earlier row (a stable sort). NaN last."""
    s = np.asarray(score, dtype=np.float64)[candidates]
    s = np.where(np.isnan(s), -np.inf, s)
    return candidates[np.lexsort((candidates, np.asarray(position)[candidates], -s))]


def ta_opd_keep(score, signals: dict, budget: float, valid=None, selector: str = "",
                seed: int = 0, min_keep: int = 1) -> np.ndarray:
    """(N,) bool: the released TA-OPD rule over one rollout batch of N response rows.

    score: (N,) the selector's score; signals needs sample (which rollout), position (within
    its response) and, for the fill, topk_entropy / union_fkl / compat_mass; valid: (N,) bool,
    the rows the loss may train on (None: all). Keeps max(1, ceil(ρ·N_valid)) valid rows by
    best_first over the whole batch (selector "random": a random.Random(seed) shuffle of them);
    then each sample that kept fewer than min_keep gets its best remaining rows by ca_softor,
    beyond the budget. Only valid rows are ever kept."""
    sample, position = np.asarray(signals["sample"]), np.asarray(signals["position"])
    n = len(sample)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    rows = np.flatnonzero(valid)
    keep = np.zeros(n, dtype=bool)
    if not len(rows):
        return keep
    k = budget_count(len(rows), budget, "released")
    if selector == "random":
        shuffled = rows.tolist()
        random.Random(seed).shuffle(shuffled)
        keep[shuffled[:k]] = True
    else:
        keep[best_first(score, position, rows)[:k]] = True
    fill = None  # computed only if some sample is short
    for b in np.unique(sample[rows]) if min_keep > 0 else ():
        mine = rows[sample[rows] == b]
        short = min_keep - int(keep[mine].sum())
        if short > 0:
            fill = ca_softor(signals) if fill is None else fill
            keep[best_first(fill, position, mine[~keep[mine]])[:short]] = True
    return keep


def keep_positions(signals: dict, selector: str, budget: float, valid=None, rule: str = "released",
                   seed: int = 0, normalize_over: str = "response") -> np.ndarray:
    """(N,) bool over one batch's response rows in row-major order. signals: (N,) arrays
    topk_entropy, union_fkl, compat_mass, fkl, sample, position, response_length; valid: (N,)
    bool, the rows the loss may train on (None: all). normalize_over: "response" (every row, the
    released code's default) or "valid" (its variant: the trainable rows only)."""
    n = len(signals["sample"])
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if selector == "all":
        return valid.copy()
    if rule not in KEEP_RULES:
        raise ValueError(f"unknown rule {rule!r}; one of {KEEP_RULES}")
    if normalize_over not in ("response", "valid"):
        raise ValueError(f"normalize_over must be 'response' or 'valid', got {normalize_over!r}")
    if rule == "paper_text":  # scores and normalisation over the trainable rows, as teachdiag ≤ 0.2
        sub = {k: np.asarray(v)[valid] for k, v in signals.items()}
        keep = np.zeros(n, bool)
        keep[valid] = paper_text_keep(selector_scores(sub, selector, seed, "teachdiag"), sub["sample"], budget)
        return keep
    pop = np.ones(n, bool) if normalize_over == "response" else valid
    sub = {k: np.asarray(v)[pop] for k, v in signals.items()}
    keep = np.zeros(n, bool)
    keep[pop] = ta_opd_keep(selector_scores(sub, selector, seed), sub, budget, valid[pop], selector, seed)
    return keep


def paper_text_keep(score, sample, budget: float) -> np.ndarray:
    """(N,) bool: the rule teachdiag ≤ 0.2 read from the paper's text, for reproducing runs made
    with it. round(ρ·N) top scores over all positions, at least one per sample: each sample's best
    first, then the best of the rest, so max(round(ρ·N), samples) in all. Ties to the earlier
    row; NaN never preferred over a number."""
    scores, sample = np.asarray(score, dtype=np.float64), np.asarray(sample)
    n = len(scores)
    wanted = budget_count(n, budget, "round")
    key = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.lexsort((np.arange(n), -key))  # best first; equal scores: earlier index first
    keep = np.zeros(n, dtype=bool)
    seen: set = set()
    for i in order:  # each sample's best position
        if sample[i] not in seen:
            seen.add(sample[i])
            keep[i] = True
    room = max(wanted, len(seen)) - len(seen)
    keep[[i for i in order if not keep[i]][:room]] = True
    return keep
