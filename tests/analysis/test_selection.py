"""The budgeted selection rule of DESIGN "Analysis" and its edge cases.

    python -m pytest -q tests/test_selection.py
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthetic import make_tokens
from teachdiag.analysis.stats import add_scores
from teachdiag.scores import budget_count
from teachdiag.analysis.selection import (BUDGETS, SELECTORS, select_top, selection_table,
                                         table_order)


@pytest.mark.parametrize("n, rho, k", [(100, 0.03, 3), (100, 0.01, 1), (1000, 0.05, 50),
                                       (7, 0.01, 1), (1, 0.01, 1), (0, 0.05, 0), (101, 0.1, 11),
                                       (10, 1.0, 10)])
def test_budget_size_is_ceil_without_float_noise(n, rho, k):
    assert budget_count(n, rho, "ceil") == k  # 0.03 * 100 = 3.0000000000000004 must stay 3


@pytest.mark.parametrize("rho", [0, -0.1, 1.5])
def test_budget_size_rejects_out_of_range(rho):
    with pytest.raises(ValueError):
        budget_count(10, rho, "ceil")


def test_select_top_ties_go_to_the_earlier_index_and_nan_last():
    s = np.array([1.0, 5.0, 5.0, np.nan, 5.0, 2.0])
    assert list(np.flatnonzero(select_top(s, 2))) == [1, 2]
    assert list(np.flatnonzero(select_top(s, 4))) == [1, 2, 4, 5]
    assert select_top(s, 6).all() and not select_top(s, 0).any()
    assert list(np.flatnonzero(select_top(np.array([np.nan, -np.inf]), 1))) == [1]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 40))
def test_select_top_keeps_exactly_k_and_the_highest(scores, k):
    s = np.array(scores, dtype=float)
    k = min(k, len(s))
    m = select_top(s, k)
    assert m.sum() == k
    if 0 < k < len(s):
        assert s[m].min() >= s[~m].max()
        cut = s[m].min()  # among tied scores, the kept ones come first
        tied = np.flatnonzero(s == cut)
        assert list(tied[m[tied]]) == list(tied[: m[tied].sum()])


def _table(scores, gains, ctx, pos):
    n = len(scores)
    return pd.DataFrame({"context_id": ctx, "position": pos, "gain": gains,
                         **{c: scores for c in ["teachability", "incompat", "fkl", "union_fkl",
                                                "topk_entropy", "student_entropy", "tip",
                                                "teach_entropy", "random"]},
                         "n": np.arange(n)})


def test_table_order_is_context_first_appearance_then_position():
    df = pd.DataFrame({"context_id": ["b", "a", "b", "a"], "position": [5, 1, 2, 0]})
    t = table_order(df)
    assert list(zip(t["context_id"], t["position"])) == [("b", 2), ("b", 5), ("a", 0), ("a", 1)]


def test_selection_ties_pick_earlier_positions_in_table_order():
    # constant scores: every selector keeps the first k rows in table order, whatever row order
    df = _table(np.ones(8), np.arange(8.0), ["x"] * 4 + ["y"] * 4, [3, 2, 1, 0] * 2)
    shuffled = df.iloc[[3, 1, 0, 2, 7, 4, 6, 5]]  # rows out of order, contexts still x then y
    sel = selection_table(shuffled, "gain", budgets=[0.25],
                          selectors={"flat": "fkl"}).set_index("selector")
    # k = 2: context x positions 0 and 1 -> gains 3 and 2
    assert sel.loc["flat", "k"] == 2 and sel.loc["flat", "mean_gain"] == pytest.approx(2.5)
    assert sel.loc["flat", "tied_at_cutoff"] == 2
    assert sel.loc["oracle", "mean_gain"] == pytest.approx(6.5)  # gains 7, 6


def test_oracle_overlap_is_one_and_oracle_keeps_the_most():
    df = add_scores(make_tokens(n_ctx=30, n_pos=20, seed=5))
    sel = selection_table(df, "rel_gain_fkl")
    o = sel[sel["selector"] == "oracle"]
    assert (o["overlap_oracle"] == 1).all()
    assert list(sel.groupby("budget")["k"].first()) == [budget_count(600, b, "ceil") for b in BUDGETS]
    best = sel.groupby("budget")["mean_gain"].max()
    np.testing.assert_allclose(o.set_index("budget")["mean_gain"], best)
    assert (sel["overlap_oracle"].between(0, 1)).all() and (sel["n"] == 600).all()
    kept = sel[sel["selector"] == "teachability"]["share_of_gain"]
    assert (kept > 0).all() and (kept <= 1).all()


def test_one_position_per_context_and_tiny_tables():
    df = _table(np.array([0.1, 0.9, 0.5]), np.array([1.0, 2.0, 3.0]), ["a", "b", "c"], [0, 0, 0])
    sel = selection_table(df, "gain", budgets=[0.01]).set_index("selector")
    assert (sel["k"] == 1).all()  # ceil(0.01 * 3) = 1
    assert sel.loc["fkl", "mean_gain"] == 2.0 and sel.loc["oracle", "mean_gain"] == 3.0
    assert sel.loc["fkl", "overlap_oracle"] == 0
    one = selection_table(df.iloc[:1], "gain", budgets=[0.05])
    assert (one["k"] == 1).all() and (one["overlap_oracle"] == 1).all()


def test_nonfinite_gain_rows_are_left_out():
    df = _table(np.arange(5.0), np.array([1.0, np.nan, 3.0, np.inf, 5.0]), ["a"] * 5, range(5))
    sel = selection_table(df, "gain", budgets=[0.5])
    assert (sel["n"] == 3).all() and (sel["k"] == 2).all()
    assert sel.set_index("selector").loc["fkl", "mean_gain"] == pytest.approx(4.0)


def test_position_selector_needs_response_length_and_leaves_the_others_bit_identical():
    df = make_tokens(n_ctx=20, n_pos=15, seed=2)
    df["response_length"] = 15 + 10 * (np.arange(len(df)) // 15 % 2)  # some responses go on unseen
    t = add_scores(df)
    frac = (t["position"] + 0.5) / t["response_length"]
    np.testing.assert_allclose(t["position_weight"], 0.25 + 0.75 / (1 + np.exp(-(frac - 0.3) / 0.1)), rtol=1e-14)
    sel = selection_table(t, "rel_gain_fkl", budgets=[0.1])
    r = sel.set_index("selector").loc["position"]
    o = table_order(t)
    kept = o["rel_gain_fkl"].to_numpy()[np.lexsort((np.arange(len(o)), -(o["position"] + 0.5) / o["response_length"]))]
    assert r["mean_gain"] == pytest.approx(kept[: r["k"]].mean(), abs=1e-12)
    others = {k: v for k, v in SELECTORS.items() if k != "position"}
    pd.testing.assert_frame_equal(sel[sel["selector"] != "position"].reset_index(drop=True),
                                  selection_table(t, "rel_gain_fkl", budgets=[0.1], selectors=others),
                                  check_exact=True)
    # no response_length, no position_weight column, no position row; the rest unchanged
    bare = add_scores(df.drop(columns="response_length"))
    assert "position_weight" not in bare.columns
    got = selection_table(bare, "rel_gain_fkl", budgets=[0.1])
    assert "position" not in set(got["selector"])
    pd.testing.assert_frame_equal(got, selection_table(t, "rel_gain_fkl", budgets=[0.1], selectors=others),
                                  check_exact=True)


def test_ta_opd_selection_is_the_released_rule_per_batch_of_contexts():
    """Against the row-by-row reference (reference_ta_opd.ref_keep), batch by batch."""
    import math

    from reference_ta_opd import ref_keep
    from teachdiag.analysis.selection import ta_opd_selection

    lengths = [1, 7, 12, 3, 20, 9, 14]  # ragged, one one-token response; 7 contexts in batches of 3
    df = make_tokens(n_ctx=7, n_pos=20, seed=2)
    df = df[df["position"] < np.repeat(lengths, 20)].assign(response_length=np.repeat(lengths, lengths))
    df = df.sample(frac=1, random_state=0)  # the analysis orders the table itself
    got = ta_opd_selection(df, "rel_gain_fkl", budgets=[0.05, 0.1], batch=3).set_index(["budget", "selector"])
    t = table_order(df)
    g = t["rel_gain_fkl"].to_numpy()
    ctx = pd.factorize(t["context_id"])[0]
    filled = 0
    for rho in (0.05, 0.1):
        for sel in ("teachability", "entropy", "tip"):
            keep = []
            for b in range(0, 7, 3):
                part = t[(ctx >= b) & (ctx < b + 3)]
                rows = [{"sample": s, "pos": p, "valid": 1, "H": h, "D": d, "C": c} for s, p, h, d, c in
                        zip(ctx[(ctx >= b) & (ctx < b + 3)], part["position"], part["topk_entropy"],
                            part["union_fkl"], part["compat_mass"])]
                keep += ref_keep(rows, sel, rho)
            keep = np.array(keep, bool)
            row = got.loc[(rho, sel)]
            assert row["k"] == keep.sum() and row["mean_gain"] == pytest.approx(g[keep].mean(), rel=1e-12)
            assert row["ci_low"] < row["mean_gain"] < row["ci_high"]
            budget = sum(max(1, math.ceil(((ctx >= b) & (ctx < b + 3)).sum() * rho)) for b in range(0, 7, 3))
            assert row["k"] - row["filled"] == budget
            filled += row["filled"]
    assert filled > 0  # some context was left empty by the budget and filled
