"""The bootstrap's arithmetic at scale: Spearman in integers, per-context sums, the Kendall counts.

    python -m pytest -q tests/analysis/test_bootstrap.py

Tables of researchers' sizes (57,600 rows a pair) must give the numbers small tables always gave,
so the fast paths are checked against the plain definitions on small inputs: bit for bit where the
arithmetic is exact (integer ranks), to rounding where the order of addition changes (context sums).
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from synthetic import make_tokens
from teachdiag.analysis import bootstrap as B
from teachdiag.analysis import selection as L
from teachdiag.analysis import stats as A


def _table(n: int, n_ctx: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes, signals (n, 4) and gains (n, 2), with ties (small integers, a constant) and without."""
    rng = np.random.default_rng(seed)
    codes = pd.factorize(rng.integers(0, n_ctx, n))[0]
    X = np.column_stack([rng.integers(0, 5, n), rng.standard_normal(n), rng.integers(0, 3 * n, n),
                         np.zeros(n)]).astype(float)
    G = np.column_stack([X[:, 0] + rng.standard_normal(n), rng.integers(0, 3, n)]).astype(float)
    return codes, X, G


def _spearman_by_rows(counts, codes, x, g):
    """The earlier code's Spearman draws: mid-ranks per row, moments summed in float64 over the rows."""
    def ranks(v):
        _, inv = np.unique(v, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(inv[order])) + 1]
        wu = np.add.reduceat(counts[:, codes[order]], starts, axis=1)
        mid = np.cumsum(wu, axis=1) - (wu - 1) / 2 - (wu.sum(1, keepdims=True) + 1) / 2
        return mid[:, inv]

    W, R, RG = counts[:, codes], ranks(x), ranks(g)
    vx, vg = np.einsum("bn,bn->b", W * R, R), np.einsum("bn,bn->b", W * RG, RG)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bn,bn->b", W * RG, R) / np.sqrt(vx * vg)


@pytest.mark.parametrize("n, n_ctx, seed", [(7, 3, 0), (300, 40, 1), (2000, 90, 2)])
def test_spearman_draws_equal_the_row_sums_bit_for_bit(n, n_ctx, seed):
    codes, X, G = _table(n, n_ctx, seed)
    counts = np.concatenate(list(B.count_chunks(codes, 200, seed)))
    rho = B.spearman_draws(counts, codes, [B.rank_groups(x, codes) for x in X.T],
                           [B.rank_groups(g, codes) for g in G.T])
    for i in range(X.shape[1]):
        for j in range(G.shape[1]):
            assert np.array_equal(rho[:, i, j], _spearman_by_rows(counts, codes, X[:, i], G[:, j]),
                                  equal_nan=True), (i, j)
    assert np.isnan(rho[:, 3]).all()  # the constant signal


def test_spearman_draws_do_not_depend_on_the_chunking(monkeypatch):
    codes, X, G = _table(500, 30, 3)
    counts = np.concatenate(list(B.count_chunks(codes, 50, 3)))
    xs, gs = [B.rank_groups(x, codes) for x in X.T], [B.rank_groups(g, codes) for g in G.T]
    together = B.spearman_draws(counts, codes, xs, gs)  # 50 resamples at once
    monkeypatch.setattr(B, "CELLS", 1)  # one resample at a time, as for a 576k-row table
    assert np.array_equal(B.spearman_draws(counts, codes, xs, gs), together, equal_nan=True)


def test_spearman_draws_equal_scipy_on_the_resampled_rows():
    codes, X, G = _table(150, 12, 4)
    counts = next(B.count_chunks(codes, 5, 4))
    rho = B.spearman_draws(counts, codes, [B.rank_groups(X[:, 0], codes)], [B.rank_groups(G[:, 0], codes)])
    for b in range(5):
        rep = np.repeat(np.arange(len(codes)), counts[b, codes].astype(int))
        assert rho[b, 0, 0] == pytest.approx(stats.spearmanr(X[rep, 0], G[rep, 0])[0], abs=1e-12)


def test_chunks_hold_at_least_min_chunk_resamples_and_the_draws_stay():
    small, big = np.arange(1000) % 50, np.arange(200_000) % 50
    assert [len(c) for c in B.count_chunks(small, 5000, 0)][0] == B.CELLS // 1000
    sizes = [len(c) for c in B.count_chunks(big, 100, 0)]
    assert sizes == [B.MIN_CHUNK] * 3 + [100 - 3 * B.MIN_CHUNK]  # CELLS alone: 10 a chunk
    # same contexts, same seed: the same resamples, however they are chunked
    assert np.array_equal(np.concatenate(list(B.count_chunks(big, 100, 0))),
                          np.concatenate(list(B.count_chunks(small, 100, 0))))


def test_context_sums_only_for_big_tables_and_equal_the_row_sums(monkeypatch):
    codes, X, _ = _table(400, 25, 5)
    assert B.context_sums(codes, [X]) is None  # small: summed row by row, as always
    monkeypatch.setattr(B, "DENSE_ROWS", 100)
    per_context = B.context_sums(codes, [X])
    for counts in B.count_chunks(codes, 64, 5):
        sw, (sX,) = B.weighted_sums(counts, codes, [X], per_context)
        rw, (rX,) = B.weighted_sums(counts, codes, [X], None)
        assert np.array_equal(sw, rw)  # integer counts: exact either way
        np.testing.assert_allclose(sX, rX, rtol=1e-12, atol=1e-9)


def test_every_statistic_by_context_sums_equals_the_row_sums(monkeypatch):
    """correlations, OLS, Q3, bins and the TA-OPD CIs on the per-context path (forced on a small
    table) equal the row-sum path to rounding."""
    df = A.add_scores(make_tokens(n_ctx=30, n_pos=20, seed=6))

    def run():
        return [A.correlations(df, gains=["rel_gain_fkl"], signals=["fkl", "teachability", "position"],
                               n_boot=100), A.regressions(df, "rel_gain_fkl", n_boot=100),
                A.q3_gap(df, "rel_gain_fkl", n_boot=100), A.gain_by_bin(df, "fkl", "rel_gain_fkl", n_boot=100),
                L.ta_opd_selection(df, "rel_gain_fkl", n_boot=100)]

    rows = run()
    monkeypatch.setattr(B, "DENSE_ROWS", 0)
    for old, new in zip(rows, run()):
        num = old.select_dtypes("number").columns
        pd.testing.assert_frame_equal(old.drop(columns=num), new.drop(columns=num))
        np.testing.assert_allclose(new[num].to_numpy(float), old[num].to_numpy(float), rtol=1e-9, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=80))
def test_count_earlier_smaller_by_brute_force(values):
    r = np.array(values)
    expect = [sum(r[j] < r[i] for j in range(i)) for i in range(len(r))]
    assert B._count_earlier_smaller(r).tolist() == expect


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=2, max_size=60))
def test_kendall_influence_s_by_brute_force(pairs):
    """psi from the O(n²) definition s_i = Σ_j sign(x_i − x_j) sign(y_i − y_j), ties in both."""
    x, y = np.array(pairs, dtype=float).T
    tau, psi = B.kendall_influence(x, y)
    s = (np.sign(x[:, None] - x[None]) * np.sign(y[:, None] - y[None])).sum(1)
    ax, ay = (x[:, None] != x[None]).sum(1), (y[:, None] != y[None]).sum(1)
    if ax.sum() == 0 or ay.sum() == 0:
        assert np.isnan(tau)
        return
    root = np.sqrt(ax.sum() * ay.sum())
    np.testing.assert_allclose(psi, 2 * s / root - s.sum() / root * (ax / ax.sum() + ay / ay.sum()), atol=1e-12)
    rx, ry = np.unique(x, return_inverse=True)[1], np.unique(y, return_inverse=True)[1]
    tau2, psi2 = B.kendall_influence(x, y, rx, ry)  # ranks given: the same numbers
    assert tau2 == tau and np.array_equal(psi2, psi)


def test_point_spearman_from_given_ranks_equals_scipy_bit_for_bit():
    codes, X, G = _table(500, 20, 7)
    for x in X.T[:3]:
        inv = (np.unique(x, return_inverse=True)[1], np.unique(G[:, 0], return_inverse=True)[1])
        est, _ = A._point(x, G[:, 0], inv, (stats.rankdata(x), stats.rankdata(G[:, 0])))
        assert est["spearman"] == stats.spearmanr(x, G[:, 0])[0]


def test_select_top_with_a_kept_order_is_select_top():
    s = np.array([3.0, np.nan, 1.0, 3.0, -np.inf, 2.0])
    order = L.top_order(s)
    for k in range(len(s) + 1):
        assert np.array_equal(L.select_top(s, k, order), L.select_top(s, k))
    assert L.select_top(s, 3).tolist() == [True, False, False, True, False, True]
