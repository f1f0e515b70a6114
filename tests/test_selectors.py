"""The TA-OPD selection rule against an independent row-by-row reference (reference_ta_opd.py,
written from the released code's rule table), the top-K signals against a dict-based reference,
and the budget rules on planted counts."""

import math

import numpy as np
import pytest
import torch

from reference_ta_opd import ref_keep, ref_topk_signals
from teachdiag.probe.signals import signals_from_logits
from teachdiag.probe.topk import served_signals, topk_lists
from teachdiag.scores import (budget_count, keep_positions, paper_text_keep, quantile_normalize, selector_scores,
                              ta_opd_keep)
from teachdiag.selectors import ta_opd_mask


def ragged_batch(rng, b=8, t_max=96, ties=False):
    """Rows of a ragged rollout batch: lengths 1..t_max (one one-token response), some rows
    loss-masked; signals drawn continuous, or from a few values so that scores tie exactly."""
    lengths = rng.integers(1, t_max + 1, size=b)
    lengths[0] = 1
    rows = []
    for s, n in enumerate(lengths):
        for j in range(n):
            draw = (lambda: float(rng.integers(0, 4)) / 4) if ties else (lambda: float(rng.gamma(1.0)))
            rows.append({"sample": s, "pos": j, "valid": int(rng.random() > 0.15 or s == 0),
                         "H": draw() / 4, "D": draw(), "C": min(1.0, draw() / 3)})
    return rows


def as_signals(rows):
    return {"topk_entropy": np.array([r["H"] for r in rows]), "union_fkl": np.array([r["D"] for r in rows]),
            "compat_mass": np.array([r["C"] for r in rows]), "fkl": np.array([r["D"] for r in rows]),
            "sample": np.array([r["sample"] for r in rows]), "position": np.array([r["pos"] for r in rows]),
            "response_length": np.array([0] * len(rows))}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.10])
@pytest.mark.parametrize("selector", ["teachability", "entropy", "tip", "random"])
def test_released_rule_equals_the_reference_on_ragged_batches(selector, budget, ties):
    for seed in range(6):
        rng = np.random.default_rng([seed, int(ties)])
        rows = ragged_batch(rng, ties=ties)
        sig = as_signals(rows)
        valid = np.array([r["valid"] for r in rows], bool)
        got = keep_positions(sig, selector, budget, valid, seed=seed)
        want = ref_keep(rows, selector, budget, seed=seed)
        assert got.astype(int).tolist() == want, (selector, budget, ties, seed)
        # the budget, and at least one kept row in every sample with a trainable row
        k = max(1, math.ceil(valid.sum() * budget))
        assert got.sum() >= k and not (got & ~valid).any()
        assert all(got[sig["sample"] == s].any() for s in np.unique(sig["sample"][valid]))


def test_fill_uses_the_soft_or_and_goes_beyond_the_budget():
    # sample 0 wins the budget on teachability; sample 1 gets its best by H̃ ∨ norm(D·C), which here
    # is its position 1 although position 0 has the higher teachability
    rows = [{"sample": 0, "pos": j, "valid": 1, "H": 0.0, "D": 5.0 + j, "C": 1.0} for j in range(10)]
    rows += [{"sample": 1, "pos": 0, "valid": 1, "H": 0.0, "D": 0.5, "C": 0.9},
             {"sample": 1, "pos": 1, "valid": 1, "H": 1.0, "D": 0.1, "C": 0.1}]
    got = keep_positions(as_signals(rows), "teachability", 0.1)
    assert got.nonzero()[0].tolist() == [8, 9, 11] == [i for i, k in enumerate(ref_keep(rows, "teachability", 0.1)) if k]


def test_ties_go_to_the_earliest_position_within_the_response_across_samples():
    # equal scores everywhere: sample 1's position 0 comes before sample 0's position 1
    rows = [{"sample": s, "pos": j, "valid": 1, "H": 0.3, "D": 0.3, "C": 0.3} for s in range(2) for j in range(5)]
    got = keep_positions(as_signals(rows), "teachability", 0.2)  # ceil(2.0) = 2: a flat score is all 0
    assert got.nonzero()[0].tolist() == [0, 5]
    # 100 · 0.07 = 7.000000000000001: the released count is 8, positions 0-3 of each sample
    rows = [{"sample": s, "pos": j, "valid": 1, "H": 0.3, "D": 0.3, "C": 0.3} for s in range(2) for j in range(50)]
    assert keep_positions(as_signals(rows), "tip", 0.07).nonzero()[0].tolist() == [0, 1, 2, 3, 50, 51, 52, 53]


def test_normalisation_population_includes_loss_masked_rows():
    differ = 0
    for seed in range(8):
        rows = ragged_batch(np.random.default_rng(seed))
        # a sample the loss may not train on (e.g. a truncated rollout): it still moves the quantiles
        rows += [{"sample": 8, "pos": j, "valid": 0, "H": 0.9, "D": 40.0, "C": 0.01} for j in range(60)]
        sig, valid = as_signals(rows), np.array([r["valid"] for r in rows], bool)
        over_all = keep_positions(sig, "teachability", 0.05, valid)
        over_valid = keep_positions(sig, "teachability", 0.05, valid, normalize_over="valid")
        sub = [r for r in rows if r["valid"]]  # the variant: the reference on the trainable rows alone
        want = np.zeros(len(rows), bool)
        want[valid] = np.array(ref_keep(sub, "teachability", 0.05), bool)
        assert over_valid.tolist() == want.tolist()
        differ += over_all.tolist() != over_valid.tolist()
    assert differ  # the population matters


def test_budget_rules():
    assert 100 * 0.07 > 7  # float noise the released code keeps: ceil gives 8 there
    assert budget_count(100, 0.07, "released") == 8 and budget_count(100, 0.07, "ceil") == 7
    assert budget_count(10, 0.01, "released") == 1 and budget_count(10, 0.01, "round") == 0
    assert [budget_count(n, r, "round") for n, r in ((50, 0.05), (150, 0.05), (250, 0.05))] == [2, 8, 12]
    assert budget_count(0, 0.5, "released") == 0
    for rule in ("released", "round", "ceil"):
        with pytest.raises(ValueError):
            budget_count(10, 0.0, rule)


def test_flat_scores_below_the_threshold_normalise_to_zero():
    x = 1.0 + np.arange(10) * 1e-14  # q95 − q05 ≈ 9e-14
    assert (quantile_normalize(x, eps=1e-12) == 0).all() and quantile_normalize(x).max() == 1.0
    sig = {"topk_entropy": x, "union_fkl": x, "compat_mass": x, "fkl": x}
    assert (selector_scores(sig, "tip") == 0).all()


def test_paper_text_rule_keeps_each_samples_best_then_the_best_rest():
    scores = np.array([5.0, 5.0, 1.0, 0.0, 0.5, 9.0, 9.0, 2.0, 2.0, 3.0])
    sample = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    # round(5): each sample's best 0 (tie with 1: earlier), 4, 5 (tie with 6), 9; then the best left, 6
    assert paper_text_keep(scores, sample, 0.5).nonzero()[0].tolist() == [0, 4, 5, 6, 9]
    assert paper_text_keep(scores, sample, 0.1).nonzero()[0].tolist() == [0, 4, 5, 9]  # one each
    keep = paper_text_keep(scores, sample, 0.7)  # 7: 6 and 1, then 7 and 8 tie at 2.0: the earlier, 7
    assert keep.nonzero()[0].tolist() == [0, 1, 4, 5, 6, 7, 9]
    with pytest.raises(ValueError):
        paper_text_keep(scores, sample, 0.0)


# ---------------------------------------------------------------- top-K signals

def items(ids, logp):
    return list(zip(ids.tolist(), logp.tolist()))


def test_served_signals_equal_the_dict_reference():
    torch.manual_seed(0)
    log_s = torch.randn(40, 50, dtype=torch.float64).mul(3).log_softmax(-1)
    log_t = torch.randn(40, 50, dtype=torch.float64).mul(3).log_softmax(-1)
    for k in (1, 2, 5, 16):
        s_ids, s_lp, t_ids, t_lp, t_at_s = topk_lists(log_s, log_t, k)
        s_lp[3, 1 % k] = float("-inf")  # a dropped entry, as a parser drops a non-finite logprob
        lower = served_signals(s_ids, s_lp, t_ids, t_lp)
        exact = served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s)
        for i in range(40):
            si, ti = items(s_ids[i], s_lp[i]), items(t_ids[i], t_lp[i])
            at = dict(items(s_ids[i], t_at_s[i]))
            for got, want in ((lower, ref_topk_signals(si, ti)), (exact, ref_topk_signals(si, ti, at))):
                for name, value in want.items():
                    assert got[name][i].item() == pytest.approx(value, rel=1e-12, abs=1e-13), (k, i, name)


def test_union_kl_floors_a_missing_student_probability():
    # K = 2: the teacher's second id is not in the student's list; the served union KL puts the
    # student at 1e-12 there, where the full-distribution union KL reads its true probability
    log_s = torch.tensor([[0.0, -0.5, -4.0, -9.0]], dtype=torch.float64).log_softmax(-1)
    log_t = torch.tensor([[0.0, -9.0, -0.2, -9.0]], dtype=torch.float64).log_softmax(-1)
    served = signals_from_logits(log_s, log_t, torch.tensor([0]), k=2, mode="topk_lb")
    full = signals_from_logits(log_s, log_t, torch.tensor([0]), k=2)
    ref = ref_topk_signals([(0, log_s[0, 0].item()), (1, log_s[0, 1].item())],
                           [(0, log_t[0, 0].item()), (2, log_t[0, 2].item())])
    assert served["union_fkl"].item() == pytest.approx(ref["union_fkl"], rel=1e-12)
    assert served["union_fkl"].item() > 10 > 5 * full["union_fkl"].item()
    # C from the teacher's list counts only id 0; exact C adds its true mass on id 1
    assert served["compat_mass"].item() == pytest.approx(log_t[0, 0].exp().item(), rel=1e-12)
    assert full["compat_mass"].item() == pytest.approx(log_t[0, :2].exp().sum().item(), rel=1e-12)
    assert signals_from_logits(log_s, log_t, torch.tensor([0]), k=2, mode="topk")["compat_mass"].item() == \
        pytest.approx(full["compat_mass"].item(), rel=1e-12)


# ---------------------------------------------------------------- the mask on (B, T, V) logits

@pytest.mark.parametrize("budget", [0.01, 0.05, 0.10])
def test_ta_opd_mask_equals_the_reference_on_padded_logits(budget):
    torch.manual_seed(1)
    b, t, v, k = 6, 24, 40, 4
    s, te = torch.randn(b, t, v) * 3, torch.randn(b, t, v) * 3
    response = torch.zeros(b, t, dtype=torch.long)
    lengths = [24, 1, 10, 17, 5, 20]
    for i, n in enumerate(lengths):
        if i % 2:  # left padding on odd rows
            response[i, t - n :] = 1
        else:
            response[i, :n] = 1
    loss = response.clone()
    loss[3, -3:] = 0  # a row whose tail the loss may not train on (still normalised over)
    got = ta_opd_mask(s, te, response, budget=budget, k=k, loss_mask=loss)
    rows = []
    for i, j in response.nonzero().tolist():
        ls, lt = s[i, j].double().log_softmax(-1), te[i, j].double().log_softmax(-1)
        si = list(zip(ls.topk(k).indices.tolist(), ls.topk(k).values.tolist()))
        ti = list(zip(lt.topk(k).indices.tolist(), lt.topk(k).values.tolist()))
        sig = ref_topk_signals(si, ti, {a: lt[a].item() for a, _ in si})
        pos = int(response[i, : j + 1].sum()) - 1
        rows.append({"sample": i, "pos": pos, "valid": int(loss[i, j]), "H": sig["topk_entropy"],
                     "D": sig["union_fkl"], "C": sig["compat_mass"]})
    want = ref_keep(rows, "teachability", budget)
    assert got[response.bool()].int().tolist() == want
    assert not got[~loss.bool()].any() and all(got[i].any() for i in range(b))


def test_ta_opd_keep_on_an_empty_batch():
    sig = {k: np.zeros(0) for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl", "sample", "position")}
    assert ta_opd_keep(np.zeros(0), sig, 0.05).shape == (0,)
