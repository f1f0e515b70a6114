"""Cluster bootstrap over contexts: resamples as context counts, the sums every moment is made of,
Spearman's rho in each resample, and a first-order Kendall tau.

    from teachdiag.analysis.bootstrap import context_sums, count_chunks, weighted_sums
    per_context = context_sums(codes, [X])        # None for tables up to DENSE_ROWS rows
    for counts in count_chunks(codes, n_boot=1000, seed=0):      # (chunk, contexts) counts
        sw, (sX,) = weighted_sums(counts, codes, [X], per_context)   # Σ w, Σ w·X per resample

Positions of one rollout are not independent, so every resample draws whole contexts
(`codes` = the context index of each row) with replacement. A resample is a vector of row
weights (the number of times the row's context was drawn), so statistics become weighted
moments computed for a chunk of resamples at once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

CELLS = 2_000_000  # resamples x rows held at once (16 MB a float array)
# Tables up to DENSE_ROWS rows sum each resample over its rows, W @ X with (b, n) row weights in
# chunks of CELLS // n resamples: the sums this package has always made. BLAS adds in an order set by
# the shapes, so those tables keep every digit of the numbers published from them. Beyond, each
# resample's sums are counts @ (per-context sums of X), made once: linear in rows, where W @ X read
# the whole table once per chunk and a 576k-row table (3 resamples a chunk) took time in rows².
# Chunks then hold MIN_CHUNK resamples (CELLS // n would be fewer).
MIN_CHUNK = 32
DENSE_ROWS = CELLS // MIN_CHUNK  # 62,500


def chunk_size(n_rows: int) -> int:
    """Resamples a chunk for a table of n_rows rows: ~CELLS row weights, at least MIN_CHUNK."""
    return max(MIN_CHUNK, CELLS // max(1, n_rows))


@functools.lru_cache(maxsize=2)
def _draw(n_ctx: int, n_boot: int, seed: int) -> np.ndarray:
    """The resamples (n_boot, n_ctx) of n_ctx contexts: made once, as every statistic of a run draws
    the same ones (a draw over 3,000 contexts takes a third of a second)."""
    counts = np.random.default_rng(seed).multinomial(n_ctx, np.full(n_ctx, 1.0 / n_ctx), size=n_boot)
    counts.flags.writeable = False
    return counts


def count_chunks(codes: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (b, G) chunks of context counts, n_boot rows in all: each row is one resample of the
    G contexts (codes (n,) int in 0..G-1) drawn with replacement. Chunks of chunk_size(n) rows;
    the draws are made at once, so they do not depend on the chunking."""
    counts = _draw(int(codes.max()) + 1, n_boot, seed)
    step = chunk_size(len(codes))
    for lo in range(0, n_boot, step):
        yield counts[lo:lo + step].astype(float)


def bootstrap_weights(codes: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (b, n) row-weight chunks: weight = times the row's context was drawn (count_chunks)."""
    for counts in count_chunks(codes, n_boot, seed):
        yield counts[:, codes]


def context_sums(codes: np.ndarray, mats: list[np.ndarray]) -> list[np.ndarray] | None:
    """What weighted_sums needs for a table over DENSE_ROWS rows, made once: rows per context (G,),
    then for each M (n, cols) of mats its sums over each context's rows (G, cols). None for a
    smaller table, summed row by row as always (see DENSE_ROWS)."""
    if len(codes) <= DENSE_ROWS:
        return None
    n_ctx = int(codes.max()) + 1
    sums = [np.bincount(codes, minlength=n_ctx).astype(float)]
    for M in mats:
        S = np.empty((n_ctx, M.shape[1]))
        for j in range(M.shape[1]):
            S[:, j] = np.bincount(codes, weights=M[:, j], minlength=n_ctx)
        sums.append(S)
    return sums


def weighted_sums(counts: np.ndarray, codes: np.ndarray, mats: list[np.ndarray],
                  per_context: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(Σ w (b,), [Σ w·M (b, cols) for M in mats]) in each resample (counts (b, G)), w being each
    row's weight: counts @ per_context (context_sums(codes, mats)), or where that is None,
    W @ M with the (b, n) row weights."""
    if per_context is not None:
        return counts @ per_context[0], [counts @ S for S in per_context[1:]]
    W = counts[:, codes]
    return W.sum(1), [W @ M for M in mats]


def percentile_ci(draws: np.ndarray) -> tuple[float, float]:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return np.nan, np.nan
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def rank_groups(x: np.ndarray, codes: np.ndarray, inv: np.ndarray | None = None) -> tuple:
    """What spearman_draws needs for x (n,): the value index of each row (np.unique's inverse;
    pass it as inv if already computed), the contexts of the rows in value order, and where each
    value's run of rows ends in that order (None when no two rows tie)."""
    if inv is None:
        inv = np.unique(x, return_inverse=True)[1]
    order = np.argsort(inv, kind="stable")
    ends = np.r_[np.flatnonzero(np.diff(inv[order])), len(inv) - 1]
    return inv, codes[order], ends if len(ends) < len(inv) else None


def spearman_draws(counts: np.ndarray, codes: np.ndarray, xs: list[tuple], gs: list[tuple],
                   progress: str | None = None) -> np.ndarray:
    """Spearman correlations (b, S, k) of each of S signals with each of k gains (their rank_groups)
    in each resample (counts (b, G)), as scipy.stats.spearmanr gives them on the resampled rows.

    In integers: a row counted w times is w tied copies, so twice its centred mid-rank,
    D = 2·(weight below its value) + (weight of its value) − N, is an integer, and so are
    Σ w·D_x·D_g (one float64 matrix product per resample, exact while its sums stay under 2^53:
    resamples of under ~300k rows) and Σ w·D² = (N³ − Σ_v w_v³) / 3 (w_v: the weight of value v,
    the tie correction; without ties Σ_v w_v³ = Σ_contexts size·count³). D is twice the rank,
    and 2·2 / √(4·4) cancels exactly in floating point, so where the old per-row float sums were
    exact too (tables under ~300k rows) the correlations are the same to the bit, however the
    resamples are chunked. Per rank vector and resample: a few integer passes over the rows.
    Give it every resample at once: its buffers are made once (a tqdm bar if `progress`)."""
    groups = [*xs, *gs]
    S, q, n = len(xs), len(groups), len(codes)
    sizes = np.bincount(codes, minlength=counts.shape[1])
    out = np.empty((len(counts), S, q - S))
    step = max(1, CELLS // (q * n))  # resamples at once: small tables vectorize, big ones go one by one
    # every buffer made once and written in place: fresh arrays cost page faults that took longer
    # than the arithmetic
    m0 = min(step, len(counts))
    D, W = np.empty((m0, q, n)), np.empty((m0, n))  # D: the signals' D, then the gains' w·D
    N_all = counts.astype(np.int64) @ sizes  # rows in each resample
    ints = np.int32 if 2 * N_all.max() < 2**31 else np.int64  # int32: half the memory traffic
    w, below, d = (np.empty((m0, n), ints) for _ in range(3))
    # Σ w·D² in int64 while N³ < 2^63 (resamples under 2M rows), else in float64 (rounded)
    kind = np.int64 if N_all.max() < 2**21 else np.float64
    starts = range(0, len(counts), step)
    if progress:
        from tqdm import tqdm  # progress only; a dependency of the package anyway
        starts = tqdm(starts, desc=progress, leave=False)
    for lo in starts:
        c = counts[lo:lo + step]
        m, N = len(c), N_all[lo:lo + step]
        cw, Nw = c.astype(ints), N.astype(ints)[:, None]
        wi, bi, di = w[:m], below[:m], d[:m]
        cubes_untied = c.astype(kind) ** 3 @ sizes.astype(kind)
        np.take(c, codes, axis=1, out=W[:m], mode="clip")
        var = np.empty((m, q))
        for a, (inv, codes_sorted, ends) in enumerate(groups):
            np.take(cw, codes_sorted, axis=1, out=wi, mode="clip")  # row weights in value order
            at = np.cumsum(wi, axis=1, out=di)  # weight at or below each row's value
            if ends is not None:  # ties: one entry per value, at its last row
                at = np.take(at, ends, axis=1, out=wi[:, :len(ends)], mode="clip")
            b = bi[:, :at.shape[1]]  # 2·below + w_v = (at or below) + below, per value
            b[:, 0] = at[:, 0]
            np.add(at[:, 1:], at[:, :-1], out=b[:, 1:])
            if ends is None:
                cubes = cubes_untied
            else:  # the weight of each value, w_v = (at or below) − below
                cubes = np.power(np.diff(at, axis=1, prepend=0), 3, dtype=kind).sum(1)
            var[:, a] = (N.astype(kind) ** 3 - cubes) // 3
            b -= Nw  # centred: D = 2·below + w_v − N
            r = np.take(b, inv, axis=1, out=di, mode="clip")  # in table order
            if a < S:
                D[:m, a] = r  # float64 for BLAS
            else:
                np.multiply(r, W[:m], out=D[:m, a])  # a gain's D enters only as w·D
        num = np.matmul(D[:m, :S], D[:m, S:].transpose(0, 2, 1))  # Σ w·D_x·D_g, (m, S, k)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:lo + step] = num / np.sqrt(var[:, :S, None] * var[:, None, S:])
    return out


# ---------------------------------------------------------------- Kendall tau-b, first order

def _count_earlier_smaller(r: np.ndarray) -> np.ndarray:
    """c_i = #{j < i : r_j < r_i} for int ranks r (n,), by a bottom-up merge sort: O(n log² n).
    Each level merges pairs of sorted runs with one stable sort, and an entry of a right run gains
    the left-run entries merged before it: a running count, no binary searches (equal values put
    the right run's entry first, so only smaller ones count)."""
    n = len(r)
    m2 = 2 * (int(r.max()) + 1) if n else 2
    place = np.arange(n)
    perm, v2, count = place.copy(), 2 * r.astype(np.int64), np.zeros(n, np.int64)  # in merged order
    w, bits = 1, 0
    while w < n:  # runs of w original indices (bit `bits` of the index tells which), sorted by r
        left = (perm & w) == 0
        key = (place >> (bits + 1)) * m2  # the pair of runs: they stay apart
        key += v2
        key += left
        o = np.argsort(key, kind="stable")
        left = left[o]
        lefts = np.cumsum(left)  # left entries at or before each place
        # less those before the pair: the count at the last place of the previous pair
        before = np.r_[0, lefts[2 * w - 1::2 * w]][place >> (bits + 1)]
        count = count[o]
        count += np.where(left, 0, lefts - before)
        perm, v2, w, bits = perm[o], v2[o], 2 * w, bits + 1
    out = np.empty(n, np.int64)
    out[perm] = count
    return out


def _run_edges(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each place of a sorted order (keys: columns in that order), the first and the last
    place of its run of places equal in every key."""
    n = len(keys[0])
    change = np.zeros(max(n - 1, 0), bool)
    for k in keys:
        change |= k[1:] != k[:-1]
    first = np.r_[0, np.flatnonzero(change) + 1]
    last = np.r_[first[1:] - 1, n - 1]
    return np.repeat(first, last - first + 1), np.repeat(last, last - first + 1)


def kendall_influence(x: np.ndarray, y: np.ndarray, rx: np.ndarray | None = None,
                      ry: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Kendall tau-b of (x, y) and its influence values psi (n,), sum 0: for row weights w,
    tau(w) ≈ tau + (n / Σw) · Σ w_i psi_i. O(n log² n), ties handled as scipy's tau-b.
    rx, ry: np.unique's inverse of x and y, when the caller has them (one sort per column, not
    per pair)."""
    n = len(x)
    rx = np.unique(x, return_inverse=True)[1] if rx is None else rx
    ry = np.unique(y, return_inverse=True)[1] if ry is None else ry
    mx, my = int(rx.max()) + 1, int(ry.max()) + 1
    cx, cy = np.bincount(rx, minlength=mx), np.bincount(ry, minlength=my)
    # strict dominance N(<,<): sort x ascending, y descending so equal-x rows never count
    if mx == n:  # no ties in x: its ranks are a permutation, and the order is their inverse
        order = np.empty(n, np.int64)
        order[rx] = np.arange(n)
    else:  # one integer sort; rows equal in both may come in any order, none counts the other
        order = np.argsort(rx * my + (my - 1 - ry))
    both_lt = np.empty(n, np.int64)
    both_lt[order] = _count_earlier_smaller(ry[order])
    x_lt = (np.cumsum(cx) - cx)[rx]
    x_gt = n - x_lt - cx[rx]
    y_lt = (np.cumsum(cy) - cy)[ry]
    # rows tied in y with a smaller / greater x, rows tied in x with a smaller y (none without
    # ties), from where each row's run of equal values begins and ends in a sorted order
    xlt_yeq = xgt_yeq = xeq_ylt = 0
    if mx < n:  # in `order`, the x-tied rows with smaller y follow the row's own (x, y) run
        sx, sy = rx[order], ry[order]
        xeq_ylt = np.empty(n, np.int64)
        xeq_ylt[order] = _run_edges(sx)[1] - _run_edges(sx, sy)[1]
    if my < n:
        by_y = np.argsort(ry * mx + rx)
        ty, tx = ry[by_y], rx[by_y]
        (y_first, y_last), (yx_first, yx_last) = _run_edges(ty), _run_edges(ty, tx)
        xlt_yeq, xgt_yeq = np.empty(n, np.int64), np.empty(n, np.int64)
        xlt_yeq[by_y], xgt_yeq[by_y] = yx_first - y_first, y_last - yx_last
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
    mats = [values[:, None] * M.T, M.T]  # each group's values and rows
    per_context = context_sums(codes, mats)
    for counts in count_chunks(codes, n_boot, seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            if per_context is None:  # the row sums as always made (see DENSE_ROWS)
                W = counts[:, codes]
                out.append(((W * values) @ M.T) / (W @ M.T))
            else:
                _, (total, rows) = weighted_sums(counts, codes, mats, per_context)
                out.append(total / rows)
    return np.concatenate(out)
