"""Statistics of teachdiag.analysis.stats on synthetic tables with a planted answer.

    python -m pytest -q tests/test_analysis.py
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from synthetic import make_tokens
from teachdiag.analysis import stats as A


@pytest.fixture(scope="module")
def planted():
    """rel_gain_fkl = 0.5 · teachability~ + context effect + noise."""
    return A.add_scores(make_tokens(n_ctx=40, n_pos=40, effect="teachability", seed=1))


# ---------------------------------------------------------------- normalization and scores

def test_quantile_normalize_known_values_clip_and_constant():
    x = np.arange(101.0)  # q05 = 5, q95 = 95
    z = A.quantile_normalize(x)
    assert z[5] == 0 and z[95] == 1 and z[50] == pytest.approx(0.5)
    assert z.min() == 0 and z.max() == 1  # clipped outside [q05, q95]
    assert np.all(A.quantile_normalize(np.full(7, 3.0)) == 0)  # q95 == q05


def hand_norm(x):
    """x̃ written out with plain numpy: clip((x − q05) / (q95 − q05), 0, 1), numpy's linear quantiles."""
    x = np.asarray(x, dtype=float)
    q05, q95 = np.quantile(x, [0.05, 0.95])
    return np.clip((x - q05) / (q95 - q05), 0.0, 1.0)


def hand_soft_or(a, b):
    return a + b - a * b


def test_add_scores_soft_or_closed_form_on_planted_values():
    """101 rows whose quantiles are known: topk_entropy and union_fkl are permutations of 0..100
    (q05 = 5, q95 = 95: x̃ = (x − 5)/90 clipped), teachability a permutation of 0, 0.01, ..., 1
    (q05 = 0.05, q95 = 0.95: T̃ = (T − 0.05)/0.9 clipped, so T̃ ≠ T off 0.5)."""
    i = np.arange(101)
    h, d, t = i.astype(float), (i * 37 % 101).astype(float), (i * 53 % 101) / 100
    df = pd.DataFrame({"topk_entropy": h, "union_fkl": d, "teachability": t})
    got = A.add_scores(df)
    H, D, T = np.clip((h - 5) / 90, 0, 1), np.clip((d - 5) / 90, 0, 1), np.clip((t - 0.05) / 0.9, 0, 1)
    np.testing.assert_allclose(got["entropy"], H, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["divergence"], D, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["tip"], H + D - H * D, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["teach_entropy"], H + T - H * T, rtol=1e-12, atol=1e-15)
    # single rows by hand. i = 50: h = 50, d = 1850 mod 101 = 32, t = 2650 mod 101 / 100 = 0.24
    #   H̃ = 0.5, D̃ = 0.3: tip = 0.5 + 0.3 − 0.15 = 0.65; T̃ = 0.19/0.9: teach_entropy = 0.5 + 0.5·T̃
    assert (d[50], t[50]) == (32.0, 0.24)
    assert got["tip"][50] == pytest.approx(0.65, abs=1e-12)
    assert got["teach_entropy"][50] == pytest.approx(0.5 + 0.5 * 0.19 / 0.9, abs=1e-12)
    # i = 0: h = d = t = 0 (all clip to 0): every soft OR is 0. i = 100: h = 100 (H̃ = 1): both are 1
    assert got["tip"][0] == 0 and got["teach_entropy"][0] == 0
    assert got["tip"][100] == pytest.approx(1.0, abs=1e-15)
    assert got["teach_entropy"][100] == pytest.approx(1.0, abs=1e-15)
    # i = 3: h = 3 < 5, so H̃ = 0 and tip = D̃; d = 111 mod 101 = 10: D̃ = 5/90
    assert d[3] == 10.0 and got["tip"][3] == pytest.approx(5 / 90, abs=1e-12)
    # (max, sum and product of 0.5 and 0.3 are 0.5, 0.8 and 0.15: the 0.65 above tells them apart)


def test_add_scores_against_numpy_from_the_raw_columns(planted):
    """On the synthetic table: every peer score from the raw columns (topk_entropy, union_fkl,
    teachability) by numpy quantiles and a + b − a·b, never from the code's own score columns."""
    h, d, t = (hand_norm(planted[c]) for c in ("topk_entropy", "union_fkl", "teachability"))
    np.testing.assert_allclose(planted["entropy"], h, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(planted["divergence"], d, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(planted["tip"], hand_soft_or(h, d), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(planted["teach_entropy"], hand_soft_or(h, t), rtol=1e-12, atol=1e-15)
    assert planted[list(A.PEER_SCORES)].min().min() >= 0
    assert planted[list(A.PEER_SCORES)].max().max() <= 1


def test_random_score_is_seeded_uniform_and_the_seed_matters(planted):
    base = planted.drop(columns=list(A.PEER_SCORES))
    r0, again, r1 = (A.add_scores(base, seed=s)["random"].to_numpy() for s in (0, 0, 1))
    np.testing.assert_array_equal(r0, again)  # same seed, same draw
    assert (r0 != r1).mean() > 0.99  # another seed, another draw (not a shifted or shared one)
    assert abs(stats.spearmanr(r0, r1)[0]) < 0.1
    for r in (r0, r1):
        assert ((r >= 0) & (r < 1)).all()
        assert stats.kstest(r, "uniform").pvalue > 1e-3  # 1600 rows: uniform on [0, 1)


# ---------------------------------------------------------------- bootstrap machinery

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=2, max_size=60))
def test_kendall_influence_matches_scipy_tau_b(pairs):
    x, y = np.array(pairs, dtype=float).T
    tau, psi = A.kendall_influence(x, y)
    ref = stats.kendalltau(x, y)[0]
    if np.isnan(ref):
        assert np.isnan(tau)
    else:
        assert tau == pytest.approx(ref, abs=1e-12)
        assert psi.sum() == pytest.approx(0, abs=1e-9)  # degree-0 homogeneous in the weights


def test_weighted_ranks_pearson_kendall_equal_an_explicit_resample():
    rng = np.random.default_rng(3)
    n = 400
    x = rng.integers(0, 15, n).astype(float)  # ties on purpose
    g = x + rng.normal(0, 4, n)
    codes = pd.factorize(rng.integers(0, 40, n))[0]
    est, psi = {}, {}
    est[0, 0], psi[0, 0] = A._point(x, g)
    draws = A._boot_block(x[:, None], g[:, None], codes, est, psi, 4, 7, None)
    counts = next(A.count_chunks(codes, 4, 7))
    for b in range(4):
        rep = np.repeat(np.arange(n), counts[b, codes].astype(int))
        assert draws[0, 0, "spearman"][b] == pytest.approx(stats.spearmanr(x[rep], g[rep])[0], abs=1e-10)
        assert draws[0, 0, "pearson"][b] == pytest.approx(stats.pearsonr(x[rep], g[rep])[0], abs=1e-10)
        # Kendall is first order in the weights: close, not equal
        assert draws[0, 0, "kendall"][b] == pytest.approx(stats.kendalltau(x[rep], g[rep])[0], abs=0.02)


def test_cluster_bootstrap_ci_covers_a_known_correlation():
    """Bivariate normal rows with a shared context effect: the population Pearson r is 0.5,
    Spearman (6/pi) asin(r/2), Kendall (2/pi) asin(r). 95% CIs must cover them ~95% of the time."""
    r = 0.5
    truth = {"pearson": r, "spearman": 6 / np.pi * np.arcsin(r / 2), "kendall": 2 / np.pi * np.arcsin(r)}
    hits, reps = {m: 0 for m in truth}, 80
    cov = np.array([[1, r], [r, 1]])
    for rep in range(reps):
        rng = np.random.default_rng(100 + rep)
        n_ctx, n_pos = 30, 10
        # half the (co)variance is shared within a context: rows of one context are correlated
        xy = (rng.multivariate_normal([0, 0], cov / 2, n_ctx).repeat(n_pos, axis=0)
              + rng.multivariate_normal([0, 0], cov / 2, n_ctx * n_pos))
        df = pd.DataFrame({"context_id": np.repeat(np.arange(n_ctx), n_pos), "s": xy[:, 0],
                           "g": xy[:, 1]})
        c = A.correlations(df, gains=["g"], signals=["s"], n_boot=200, seed=rep)
        for row in c.itertuples():
            hits[row.method] += row.ci_low <= truth[row.method] <= row.ci_high
    for m, h in hits.items():
        assert h / reps >= 0.85, (m, h / reps)


# ---------------------------------------------------------------- planted answers

def test_correlations_find_the_planted_signal(planted):
    c = A.correlations(planted, gains=["rel_gain_fkl"], n_boot=200,
                       contrasts=[("teachability", "fkl"), ("teachability", "incompat")])
    sp = c[c["method"] == "spearman"].set_index("signal")
    assert sp.loc["teachability", "ci_low"] > 0.4
    assert sp.loc["teachability - fkl", "ci_low"] > 0  # beats raw fkl, CI excludes 0
    assert sp.loc["teachability - incompat", "ci_low"] > 0
    assert sp.loc["random", "ci_low"] < 0 < sp.loc["random", "ci_high"]
    assert (c["n"] == len(planted)).all() and (c["n_contexts"] == 40).all()
    assert set(c["method"]) == {"spearman", "pearson", "kendall"}
    assert (c["ci_low"] <= c["estimate"] + 1e-9).all() or c["signal"].str.contains(" - ").any()


def test_regressions_r2_ordering_and_signs(planted):
    r = A.regressions(planted, "rel_gain_fkl", n_boot=100)
    raw = r[r["winsor"] == 0].set_index(["model", "stat", "term"])
    assert raw.loc[("teachability", "r2", ""), "estimate"] > raw.loc[("base", "r2", ""), "estimate"]
    assert raw.loc[("teachability", "delta_r2", ""), "ci_low"] > 0
    assert raw.loc[("base+C", "delta_r2", ""), "ci_low"] > 0  # C adds to [H, D, HD, ...]
    t = raw.loc[("teachability", "std_coef", "teachability")]
    assert t["ci_low"] > 0.3 and t["ci_low"] <= t["estimate"] <= t["ci_high"]
    assert raw.loc[("teachability", "coef_diff", "teachability - incompat"), "ci_low"] > 0
    assert sorted(r["winsor"].unique()) == [0, 0.01, 0.05]


def test_standardized_coefficients_equal_ols_on_zscores(planted):
    r = A.regressions(planted, "gain_fkl", winsor=[0.0], n_boot=0)
    terms = A.MODELS["base"]
    X = planted[["topk_entropy", "union_fkl"]].to_numpy()
    X = np.column_stack([X, X[:, 0] * X[:, 1], planted[["position", "teacher_entropy"]]])
    y = planted["gain_fkl"].to_numpy()
    z = lambda a: (a - a.mean(0)) / a.std(0)  # noqa: E731
    beta, *_ = np.linalg.lstsq(np.column_stack([np.ones(len(y)), z(X)]), z(y), rcond=None)
    got = r[(r["model"] == "base") & (r["stat"] == "std_coef")].set_index("term")["estimate"]
    np.testing.assert_allclose(got.loc[terms].to_numpy(), beta[1:], atol=1e-8)
    r2 = 1 - ((z(y) - np.column_stack([np.ones(len(y)), z(X)]) @ beta) ** 2).mean()
    assert r[(r["model"] == "base") & (r["stat"] == "r2")]["estimate"].iloc[0] == pytest.approx(r2)


def test_winsorize_clips_both_tails():
    y = np.arange(100.0)
    w = A.winsorize(y, 0.05)
    assert w.min() == pytest.approx(np.quantile(y, 0.05)) and w.max() == pytest.approx(np.quantile(y, 0.95))
    assert A.winsorize(y, 0) is y


@pytest.mark.parametrize("effect, sign", [("teachability", 1), ("incompat", -1)])
def test_q3_gap_sign_follows_the_planted_effect(effect, sign):
    df = A.add_scores(make_tokens(n_ctx=40, n_pos=40, effect=effect, seed=2))
    q = A.q3_gap(df, "rel_gain_fkl", n_boot=200).set_index("comparison")
    for comp in ("tercile", "matched"):
        assert sign * q.loc[comp, "ci_low"] > 0 or sign * q.loc[comp, "ci_high"] < 0
        assert np.sign(q.loc[comp, "estimate"]) == sign
        assert np.sign(q.loc[comp, "ci_low"]) == np.sign(q.loc[comp, "ci_high"]) == sign
    assert q.loc["matched", "n_pairs"] >= q.loc["matched", "n_high"] > 0


def test_gain_by_decile_rises_with_the_planted_score(planted):
    b = A.gain_by_bin(planted, "teachability", "rel_gain_fkl")
    assert list(b["bin"]) == list(range(1, 11)) and b["n"].sum() == len(planted)
    assert b["n"].max() - b["n"].min() <= 1  # equal-count bins even with ties
    assert b["gain_mean"].iloc[-1] > b["gain_mean"].iloc[0] + 0.2
    s = A.gain_by_bin(planted, "fkl", "rel_gain_fkl", split="compat_mass")
    assert set(s["half"]) == {"high", "low"} and s["n"].sum() == len(planted)
    hi = s[s["half"] == "high"]["gain_mean"].mean()
    assert hi > s[s["half"] == "low"]["gain_mean"].mean()  # high C learns more at equal fkl


def test_one_position_per_context_and_nan_gain_rows():
    df = A.add_scores(make_tokens(n_ctx=200, n_pos=1, seed=4))
    df.loc[:9, "rel_gain_fkl"] = np.nan  # e.g. fkl = 0 before the step
    c = A.correlations(df, gains=["rel_gain_fkl", "gain_fkl"], signals=["teachability", "fkl"],
                       n_boot=50)
    n = c.groupby("gain")["n"].first()
    assert n["rel_gain_fkl"] == 190 and n["gain_fkl"] == 200
    assert (c.groupby("gain")["n_contexts"].first() == n).all()
    assert np.isfinite(c["ci_low"]).all()
    r = A.regressions(df, "rel_gain_fkl", n_boot=20)
    assert r[r["term"] == "position"]["estimate"].isna().all()  # position is constant here
    assert r[r["term"] == "teachability"]["ci_low"].notna().all()
    assert len(A.q3_gap(df, "rel_gain_fkl", n_boot=20)) == 2  # matched: no pairs, NaN, no crash


def test_instrument_agreement_on_common_positions():
    from teachdiag.analysis.instruments import agreement

    rng = np.random.default_rng(0)
    a = make_tokens(n_ctx=12, n_pos=10, seed=1)
    b = a.copy()
    b["rel_gain_fkl"] = 3 * a["rel_gain_fkl"] + 1  # a monotone transform: Spearman exactly 1
    c = a.sample(frac=0.5, random_state=0).copy()  # half the positions, unrelated gains
    c["rel_gain_fkl"] = rng.normal(size=len(c))
    out = agreement({"a": a, "b": b, "c": c, "none": a.assign(context_id="other")}, "rel_gain_fkl", n_boot=50)
    sp = out[out["method"] == "spearman"].set_index(["run_a", "run_b"])
    assert sp.loc[("a", "b"), "estimate"] == pytest.approx(1.0) and sp.loc[("a", "b"), "n"] == 120
    assert sp.loc[("a", "c"), "n"] == 60  # joined on (context_id, position)
    want = stats.spearmanr(a.set_index(["context_id", "position"]).loc[
        c.set_index(["context_id", "position"]).index, "rel_gain_fkl"], c["rel_gain_fkl"])[0]
    assert sp.loc[("a", "c"), "estimate"] == pytest.approx(want)
    assert out[(out.run_a == "a") & (out.run_b == "none")]["note"].iloc[0] == "no position measured by both runs"
