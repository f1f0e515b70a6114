"""The paper protocol (teachdiag.analysis.paper) against planted answers and hand computations.

    python -m pytest -q tests/analysis/test_paper.py

Expectations are computed here with numpy directly (never by calling the code under test twice).
"""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthetic import make_tokens
from teachdiag.analysis import paper as P
from teachdiag.analysis.options import AnalyzeConfig
from teachdiag.commands.analyze import run_analyze
from teachdiag.errors import InputError
from teachdiag.scores import budget_count, quantile_normalize


def norm(x):
    """The paper's Norm, written out by hand for the planted tables (no degenerate columns)."""
    q05, q95 = np.quantile(x, [0.05, 0.95])
    return np.clip((x - q05) / (q95 - q05), 0, 1)


def planted(n_ctx, n_pos, a_l, a_i, seed):
    """Table whose G_KLf is a_l·D^L/0.2 + a_i·D^I/0.2 + 0.2·Hn + context effect + noise, exactly."""
    rng = np.random.default_rng(seed)
    n = n_ctx * n_pos
    h, d, c, ht = rng.gamma(2, 1, n), rng.lognormal(-1, 0.8, n), rng.beta(2, 2, n), rng.gamma(2, 1, n)
    dn, cn, hn = norm(d), norm(c), norm(h)
    y = (a_l * dn * cn / 0.2 + a_i * dn * (1 - cn) / 0.2 + 0.2 * hn
         + 0.3 * rng.normal(0, 1, n_ctx).repeat(n_pos) + rng.normal(0, 1, n))
    pos = np.tile(np.arange(n_pos), n_ctx)
    t = pd.DataFrame({"context_id": np.repeat(np.arange(n_ctx), n_pos).astype(str), "position": pos,
                      "response_length": n_pos, "student_entropy": h, "fkl": d, "compat_mass": c,
                      "teacher_entropy": ht, "fkl_after": d - y * (d + 1e-12)})
    X = np.column_stack([hn, dn * cn, dn * (1 - cn), pos / (n_pos - 1), norm(ht)])
    return t, X, y


def true_betas(a_l, a_i):
    """Population standardized (β_L, β_I) by a large sample and numpy's lstsq on z-scored columns."""
    _, X, y = planted(20000, 10, a_l, a_i, seed=123)
    z = lambda a: (a - a.mean(0)) / a.std(0)  # noqa: E731
    b = np.linalg.lstsq(np.column_stack([np.ones(len(y)), z(X)]), z(y), rcond=None)[0]
    return b[2], b[3]


@pytest.mark.parametrize("a_l, a_i", [(0.4, 0.2), (0.2, 0.4)], ids=["L=2I", "I=2L"])
def test_ols_recovers_the_planted_betas_with_covering_cis(a_l, a_i):
    bl, bi = true_betas(a_l, a_i)
    ratio = bl / bi if a_l > a_i else bi / bl
    assert ratio == pytest.approx(2.0, abs=0.1)  # the planted truth is what the test says
    reps, hits = 60, np.zeros(3)
    for r in range(reps):
        t, _, _ = planted(60, 10, a_l, a_i, seed=r)
        o = P.paper_ols(P.paper_scores(t), "G_KLf", winsor=(0.0,), n_boot=200, seed=r)
        o = o[o["model"] == "decomposition"].set_index(["stat", "term"])
        for i, (key, truth) in enumerate([(("std_coef", "DL"), bl), (("std_coef", "DI"), bi),
                                          (("coef_diff", "DL - DI"), bl - bi)]):
            hits[i] += o.loc[key, "ci_low"] <= truth <= o.loc[key, "ci_high"]
    assert (hits / reps >= 0.9).all(), hits / reps


def test_ols_point_estimates_equal_numpy_lstsq_and_floor():
    t, _, _ = planted(20, 10, 0.4, 0.2, seed=5)
    s = P.paper_scores(t)
    o = P.paper_ols(s, "drop_fkl", winsor=(0.0,), n_boot=0)
    z = lambda a: (a - a.mean(0)) / a.std(0)  # noqa: E731
    cols = ["Hn", "Dn", "Hn:Dn", "Cn", "pos_norm", "Htn"]
    X = np.column_stack([s["Hn"], s["Dn"], s["Hn"] * s["Dn"], s["Cn"], s["pos_norm"], s["Htn"]])
    y = (t["fkl"] - t["fkl_after"]).to_numpy()  # drop_fkl by hand (paper_scores keeps table order)
    b = np.linalg.lstsq(np.column_stack([np.ones(len(y)), z(X)]), z(s["drop_fkl"].to_numpy()), rcond=None)[0]
    np.testing.assert_allclose(s["drop_fkl"].sort_values().to_numpy(), np.sort(y))
    got = o[(o["model"] == "base+C") & (o["stat"] == "std_coef")].set_index("term")["estimate"]
    np.testing.assert_allclose(got.loc[cols].to_numpy(), b[1:], atol=1e-9)
    few = P.paper_ols(s.iloc[:69], "G_KLf", winsor=(0.0,), n_boot=10)  # base+C needs 10·7 = 70
    m = few[few["model"] == "base+C"]
    assert m["estimate"].isna().all() and m["note"].str.contains(r"n = 69; OLS with 6 terms needs n >= 70").all()
    assert np.isfinite(few[(few["model"] == "base") & (few["stat"] == "r2")]["estimate"]).all()


# ---------------------------------------------------------------- definitions

def test_norm_by_hand_and_the_1e12_rule():
    x = np.arange(101.0)  # q05 = 5, q95 = 95
    z = P.paper_norm(x)
    assert z[50] == 0.5 and z[5] == 0 and z[95] == 1 and z[0] == 0 and z[100] == 1
    assert z[20] == (20 - 5) / 90
    tiny = np.r_[np.ones(50), np.ones(50) + 1e-13]  # q95 − q05 ≈ 1e-13: below the paper's 1e-12
    assert (P.paper_norm(tiny) == 0).all()
    assert quantile_normalize(tiny).max() == 1  # the default protocol's q95 == q05 rule differs here
    assert np.isnan(P.paper_norm(np.array([1.0, np.nan, 2.0, 3.0]))[1])


def test_scores_and_relative_gain_guard():
    t = make_tokens(n_ctx=3, n_pos=5, seed=2)
    t.loc[0, ["fkl", "fkl_after"]] = [0.0, 0.0]
    t.loc[1, ["fkl", "fkl_after"]] = [1e-12, 0.0]
    s = P.paper_scores(t).set_index(["context_id", "position"])
    assert s.loc[("c000", 0), "G_KLf"] == 0.0  # 0 / 1e-12, not NaN
    assert s.loc[("c000", 1), "G_KLf"] == 1e-12 / 2e-12
    assert s.loc[("c000", 1), "drop_fkl"] == 1e-12
    r = s.loc[("c001", 3)]
    assert r["G_KLf"] == (r["fkl"] - r["fkl_after"]) / (r["fkl"] + 1e-12)
    assert r["pos_norm"] == 3 / 4
    # every score row by row from the raw columns by hand (never from the code's own Hn / DL, and
    # not sorted: a score attached to the wrong row must fail), matched on (context_id, position)
    hn, dn, cn = (norm(t[c].to_numpy()) for c in ("student_entropy", "fkl", "compat_mass"))
    dl = dn * cn
    want = pd.DataFrame({"Hn": hn, "Dn": dn, "Cn": cn, "DL": dl, "DI": dn * (1 - cn), "TIP": hn + dn - hn * dn,
                         "H_teach": hn + dl - hn * dl},
                        index=pd.MultiIndex.from_arrays([t["context_id"], t["position"]]))
    for col in want.columns:
        np.testing.assert_allclose(s[col].to_numpy(), want.loc[s.index, col].to_numpy(), rtol=1e-12, atol=1e-15,
                                   err_msg=col)
    assert not np.allclose(s["H_teach"], s["TIP"])  # the planted table tells the two soft ORs apart


def test_missing_response_length_names_file_and_field(tmp_path):
    t = make_tokens(n_ctx=2, n_pos=3).drop(columns="response_length")
    with pytest.raises(InputError) as e:
        P.paper_scores(t, source="x/tokens.csv")
    assert e.value.field == "response_length" and "x/tokens.csv" in str(e.value)
    run = tmp_path / "r"
    run.mkdir()
    t.to_csv(run / "tokens.csv", index=False)
    with pytest.raises(InputError, match="response_length"):
        run_analyze(AnalyzeConfig(runs=[str(run)], protocol="paper", bootstrap=0))
    ctx = tmp_path / "ctx.jsonl"  # the explicit helper for old tables: len(response_ids) per id
    ctx.write_text("\n".join(json.dumps({"id": c, "response_ids": [1] * 7}) for c in ("c000", "c001")))
    out = run_analyze(AnalyzeConfig(runs=[str(run)], protocol="paper", bootstrap=0,
                                    response_lengths=str(ctx)))
    assert "response_length from" in (out / "summary.md").read_text()


# ---------------------------------------------------------------- Q3 and matching

def q3_table(h, d, c, g, ctx, pos, length=10):
    n = len(h)
    return pd.DataFrame({"context_id": ctx, "position": pos, "response_length": length,
                         "student_entropy": h, "fkl": d, "compat_mass": c,
                         "teacher_entropy": np.ones(n), "fkl_after": d - g * (d + 1e-12)})


def test_q3_terciles_by_hand_with_ties_at_the_median():
    rng = np.random.default_rng(0)
    n = 120
    h = np.round(rng.uniform(0, 1, n), 1)  # many ties, also at the median
    d, c, g = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.normal(0, 1, n)
    ctx, pos = np.repeat(np.arange(12), 10).astype(str), np.tile(np.arange(10), 12)
    s = P.paper_scores(q3_table(h, d, c, g, ctx, pos))
    q = P.paper_q3(s, "G_KLf", n_boot=0).set_index("comparison")
    hn, dn = norm(h), norm(d)
    in_q3 = (hn <= np.median(hn)) & (dn >= np.median(dn))
    assert (hn == np.median(hn)).any() and q.loc["tercile", "n_q3"] == in_q3.sum()
    cq = norm(c[in_q3])
    lo, hi = cq <= np.quantile(cq, 1 / 3), cq >= np.quantile(cq, 2 / 3)
    gq = (d[in_q3] - (d[in_q3] - g[in_q3] * (d[in_q3] + 1e-12))) / (d[in_q3] + 1e-12)
    assert q.loc["tercile", "estimate"] == pytest.approx(gq[hi].mean() - gq[lo].mean(), abs=1e-12)
    assert (q.loc["tercile", "n_high"], q.loc["tercile", "n_low"]) == (hi.sum(), lo.sum())


def test_matching_pairs_nearest_neighbour_within_context():
    # context a: Q3 rows 0..3 (low H, high D); proxy C splits at its context median
    h = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    d = np.array([1.0, 0.9, 0.95, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.9, 0.0, 0.0])
    c = np.array([0.9, 0.8, 0.1, 0.2, 0.5, 0.5, 0.5, 0.5, 0.3, 0.6, 0.5, 0.5])
    g = np.array([1.0, 2.0, 0.5, 0.25, 0, 0, 0, 0, 3.0, 4.0, 0, 0])
    ctx = np.array(list("aaaaaaaa") + list("bbbb"))
    pos = np.r_[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    s = P.paper_scores(q3_table(h, d, c, g, ctx, pos, length=8))
    m = P.paper_q3(s, "G_KLf", n_boot=0).set_index("comparison").loc["matched"]
    # by hand: Q3 = rows 0-3 (context a) and 8, 9 (context b). In a, rows 0, 1 lie above the
    # context's median proxy and rows 2, 3 at or below it; in b, row 9 above, row 8 below.
    hn, dn = norm(h), norm(d)
    f = np.column_stack([hn, dn, pos / 7])
    dist = lambda i, j: ((f[i] - f[j]) ** 2).sum()  # noqa: E731
    pairs = [(0, min((2, 3), key=lambda j: dist(0, j))), (1, min((2, 3), key=lambda j: dist(1, j))), (9, 8)]
    diffs = [g[i] - g[j] for i, j in pairs]
    assert m["n_pairs"] == 3
    assert m["estimate"] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert m["median"] == pytest.approx(np.median(diffs), abs=1e-9)


def test_zero_pairs_say_why():
    # every context holds one position: each Q3 context has < 2 Q3 positions
    rng = np.random.default_rng(1)
    n = 40
    t = q3_table(rng.uniform(size=n), rng.uniform(size=n), rng.uniform(size=n), rng.normal(size=n),
                 np.arange(n).astype(str), np.zeros(n, int), length=1)
    q = P.paper_q3(P.paper_scores(t), "G_KLf", n_boot=50).set_index("comparison")
    assert q.loc["matched", "n_pairs"] == 0 and np.isnan(q.loc["matched", "estimate"])
    assert q.loc["matched", "note"] == "0 pairs: every context has < 2 Q3 positions"
    assert np.isfinite(q.loc["tercile", "ci_low"])  # 40 contexts: the tercile gap has its CI


# ---------------------------------------------------------------- selection

@pytest.mark.parametrize("n, rho, k", [(250, 0.01, 2), (250, 0.03, 8), (250, 0.05, 12), (300, 0.05, 15),
                                       (30, 0.01, 0), (100, 0.03, 3), (57600, 0.05, 2880)])
def test_round_rho_n(n, rho, k):
    assert budget_count(n, rho, "round") == k  # round half to even: 2.5 -> 2, 7.5 -> 8, 12.5 -> 12


def test_selection_keeps_round_rho_n_with_ties_to_the_earlier_position():
    t = make_tokens(n_ctx=10, n_pos=25, seed=4)
    s = P.paper_scores(t)
    sel = P.paper_selection(s, "G_KLf", budgets=(0.01, 0.03), n_boot=0)
    r = sel[(sel["selector"] == "teachability") & (sel["winsor"] == 0)].set_index("budget")
    assert list(r["k"]) == [2, 8]
    dl, g = s["DL"].to_numpy(), s["G_KLf"].to_numpy()
    top = np.lexsort((np.arange(len(dl)), -dl))[:8]  # highest first, then earlier row
    assert r.loc[0.03, "mean_gain"] == pytest.approx(g[top].mean(), abs=1e-12)
    tie = s.assign(DL=0.5)  # every score tied: the first k rows in table order
    sel = P.paper_selection(tie, "G_KLf", budgets=(0.03,), n_boot=0)
    m = sel[(sel["selector"] == "teachability") & (sel["winsor"] == 0)].iloc[0]
    assert m["mean_gain"] == pytest.approx(g[:8].mean(), abs=1e-12) and m["tied_at_cutoff"] == 8
    few = P.paper_selection(s.iloc[:30], "G_KLf", budgets=(0.01,), n_boot=0)
    assert few["mean_gain"].isna().all()
    assert (few["note"] == "too few positions (n = 30; round(0.01 · n) = 0 kept)").all()


def test_position_selector_keeps_the_latest_share_and_leaves_the_others_bit_identical(monkeypatch):
    t = make_tokens(n_ctx=12, n_pos=20, seed=6)
    t["response_length"] = 20 + 5 * (np.arange(len(t)) // 20 % 3)  # responses of 20, 25, 30 tokens
    s = P.paper_scores(t)
    frac = (s["position"].to_numpy() + 0.5) / s["response_length"].to_numpy()
    w = 0.25 + 0.75 / (1 + np.exp(-(frac - 0.3) / 0.1))  # PW-OPSD's weight, by hand
    np.testing.assert_allclose(s["position_weight"], w, rtol=1e-14)
    sel = P.paper_selection(s, "G_KLf", budgets=(0.05,), n_boot=50)
    r = sel[(sel["selector"] == "position") & (sel["winsor"] == 0)].iloc[0]
    top = np.lexsort((np.arange(len(frac)), -frac))[: r["k"]]
    assert r["score"] == "position_weight" and np.isfinite(r["ci_low"])
    assert r["mean_gain"] == pytest.approx(s["G_KLf"].to_numpy()[top].mean(), abs=1e-12)
    monkeypatch.setattr(P, "PAPER_SELECTORS", {k: v for k, v in P.PAPER_SELECTORS.items() if k != "position"})
    without = P.paper_selection(s, "G_KLf", budgets=(0.05,), n_boot=50)
    pd.testing.assert_frame_equal(sel[sel["selector"] != "position"].reset_index(drop=True), without,
                                  check_exact=True)


# ---------------------------------------------------------------- never raises on a valid table

@pytest.mark.slow  # ~55 s on a shared 2-core machine (12 examples × two protocols)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 30), n_ctx=st.integers(1, 4), seed=st.integers(0, 10))
def test_analyze_never_raises_on_small_tables(tmp_path_factory, n, n_ctx, seed):
    run = tmp_path_factory.mktemp("small") / "r"
    run.mkdir()
    t = make_tokens(n_ctx=n_ctx, n_pos=30, seed=seed)
    t = t.iloc[np.sort(np.random.default_rng(seed).choice(len(t), n, replace=False))]
    t.to_csv(run / "tokens.csv", index=False)
    (run / "run.json").write_text(json.dumps({"complete": True, "top_k": 16, "options": {}}))
    for protocol in ("teachdiag", "paper"):
        out = run_analyze(AnalyzeConfig(runs=[str(run)], protocol=protocol, bootstrap=10,
                                        out=str(run / protocol)))
        assert (out / "summary.md").stat().st_size > 100
        assert any((out / "figures").glob("*.png"))


def test_paper_protocol_with_several_runs_writes_instruments_csv(tmp_path):
    """Several runs under --protocol paper: instruments.csv, as the default protocol writes it, on
    the paper's own gain G_KLf over the positions both runs measured (#21.10.6)."""
    from scipy.stats import spearmanr

    tables = {}
    for name, seed, n_pos in (("a", 1, 30), ("b", 2, 20)):  # b measured positions 0..19 only
        t = make_tokens(n_ctx=6, n_pos=n_pos, seed=seed).assign(response_length=30)
        (tmp_path / name).mkdir()
        t.to_csv(tmp_path / name / "tokens.csv", index=False)
        tables[name] = t
    out = run_analyze(AnalyzeConfig(runs=[str(tmp_path / "a"), str(tmp_path / "b")], protocol="paper",
                                    bootstrap=0, out=str(tmp_path / "out")))
    inst = pd.read_csv(out / "instruments.csv")
    row = inst[inst["method"] == "spearman"].iloc[0]
    assert (row["run_a"], row["run_b"], row["gain"], row["n"]) == ("a", "b", "G_KLf", 6 * 20)
    both = tables["a"].merge(tables["b"], on=["context_id", "position"])
    g = [(both[f"fkl_{s}"] - both[f"fkl_after_{s}"]) / (both[f"fkl_{s}"] + 1e-12) for s in ("x", "y")]
    assert row["estimate"] == pytest.approx(spearmanr(*g)[0], rel=1e-9)
    assert "instruments.csv" in (out / "summary.md").read_text()
