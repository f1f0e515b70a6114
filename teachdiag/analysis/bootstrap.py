"""Cluster bootstrap over contexts, as integer row weights, and a first-order Kendall tau.

    from teachdiag.analysis.bootstrap import bootstrap_weights, kendall_influence
    for W in bootstrap_weights(codes, n_boot=1000, seed=0):   # W: (chunk, rows) resample counts
        ...

Positions of one rollout are not independent, so every resample draws whole contexts
(`codes` = the context index of each row) with replacement. A resample is a vector of row
weights, so statistics become weighted moments computed for a chunk of resamples at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CELLS = 2_000_000  # resamples x rows held at once (16 MB a float array)


def count_chunks(codes: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (b, G) chunks of context counts, n_boot rows in all: each row is one resample of the
    G contexts (codes (n,) int in 0..G-1) drawn with replacement. Chunks hold ~CELLS row weights."""
    n_ctx = int(codes.max()) + 1
    counts = np.random.default_rng(seed).multinomial(n_ctx, np.full(n_ctx, 1.0 / n_ctx), size=n_boot)
    step = max(1, CELLS // max(1, len(codes)))
    for lo in range(0, n_boot, step):
        yield counts[lo:lo + step].astype(float)


def bootstrap_weights(codes: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (b, n) row-weight chunks: weight = times the row's context was drawn (count_chunks)."""
    for counts in count_chunks(codes, n_boot, seed):
        yield counts[:, codes]


def percentile_ci(draws: np.ndarray) -> tuple[float, float]:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return np.nan, np.nan
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def rank_groups(x: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What weighted_ranks needs for x (n,): value-group index, contexts in x order, group starts."""
    _, inv = np.unique(x, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inv[order])) + 1]
    return inv, codes[order], starts


def weighted_ranks(counts: np.ndarray, groups: tuple) -> np.ndarray:
    """Centred mid-ranks (b, n) of each resample: row i counted W[b, i] times, ties averaged, as
    scipy.stats.rankdata on the resampled array gives them, minus their mean (N + 1) / 2."""
    inv, codes_sorted, starts = groups
    w = counts[:, codes_sorted]  # gather from the small (b, G) array: cache friendly
    wu = np.add.reduceat(w, starts, axis=1) if len(starts) < w.shape[1] else w  # (b, values)
    mid = np.cumsum(wu, axis=1) - (wu - 1) / 2 - (wu.sum(1, keepdims=True) + 1) / 2
    return mid[:, inv]


# ---------------------------------------------------------------- Kendall tau-b, first order

def _count_earlier_smaller(r: np.ndarray) -> np.ndarray:
    """c_i = #{j < i : r_j < r_i} for int ranks r (n,), by a bottom-up merge sort: O(n log² n)."""
    n = len(r)
    m = int(r.max()) + 1 if n else 1
    out, perm, w = np.zeros(n, np.int64), np.arange(n), 1
    while w < n:  # runs of w original indices, each sorted by r, merged pairwise
        pair = perm // (2 * w)
        right = (perm // w) % 2 == 1
        key = pair * m + r[perm]
        left = key[~right]  # globally sorted: pairs ascend, each left run is sorted
        out[perm[right]] += (np.searchsorted(left, key[right])
                             - np.searchsorted(left, pair[right] * m))
        perm, w = perm[np.argsort(key, kind="stable")], 2 * w
    return out


def kendall_influence(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Kendall tau-b of (x, y) and its influence values psi (n,), sum 0: for row weights w,
    tau(w) ≈ tau + (n / Σw) · Σ w_i psi_i. O(n log² n), ties handled as scipy's tau-b."""
    n = len(x)
    rx, ry = np.unique(x, return_inverse=True)[1], np.unique(y, return_inverse=True)[1]
    mx, my = int(rx.max()) + 1, int(ry.max()) + 1
    cx, cy = np.bincount(rx, minlength=mx), np.bincount(ry, minlength=my)
    # strict dominance N(<,<): sort x ascending, y descending so equal-x rows never count
    order = np.lexsort((-ry, rx))
    both_lt = np.empty(n, np.int64)
    both_lt[order] = _count_earlier_smaller(ry[order])
    x_lt = (np.cumsum(cx) - cx)[rx]
    x_gt = n - x_lt - cx[rx]
    y_lt = (np.cumsum(cy) - cy)[ry]
    kyx = np.sort(ry * mx + rx)  # rows keyed by (y, x)
    xlt_yeq = np.searchsorted(kyx, ry * mx + rx) - np.searchsorted(kyx, ry * mx)
    xgt_yeq = np.searchsorted(kyx, (ry + 1) * mx) - np.searchsorted(kyx, ry * mx + rx + 1)
    kxy = np.sort(rx * my + ry)
    xeq_ylt = np.searchsorted(kxy, rx * my + ry) - np.searchsorted(kxy, rx * my)
    # s_i = Σ_j sign(x_i - x_j) sign(y_i - y_j), from the cell counts above
    s = 4 * both_lt + x_gt - x_lt - 2 * y_lt + 2 * xeq_ylt - xgt_yeq + xlt_yeq
    ax, ay = (n - cx[rx]).astype(float), (n - cy[ry]).astype(float)  # untied partners
    big_ax, big_ay = ax.sum(), ay.sum()
    if big_ax == 0 or big_ay == 0:
        return np.nan, np.full(n, np.nan)
    root = np.sqrt(big_ax * big_ay)
    tau = s.sum() / root
    return float(tau), 2 * s / root - tau * (ax / big_ax + ay / big_ay)


def group_mean_draws(values: np.ndarray, groups: np.ndarray, codes: np.ndarray, n_boot: int,
                     seed: int) -> np.ndarray:
    """Cluster-bootstrap draws (n_boot, m) of the mean of `values` (n,) over each of m row groups
    (groups: (m, n) bool, membership fixed across resamples). NaN where a resample holds no row of
    a group. One definition for every "mean gain of a set, with a CI" (bins, terciles, selections)."""
    M = np.asarray(groups, dtype=float)
    if n_boot <= 0 or len(values) == 0:
        return np.zeros((0, len(M)))
    out = []
    for W in bootstrap_weights(codes, n_boot, seed):  # (b, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(((W * values) @ M.T) / (W @ M.T))
    return np.concatenate(out)
