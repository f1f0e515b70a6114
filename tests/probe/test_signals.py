"""Signals against an independent float64 NumPy reference, plus their basic properties; the
clipped forward KL (a training loss) and the position weight against references written here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import ref_signals
from teachdiag.probe import signals as signals_module
from teachdiag.probe.signals import (SIGNALS, chunk_rows, clipped_fkl, entropy, keep_mask, kl, kls_from_logits, loss_grad,
                                     probe_loss, row_dot, signals_from_logits)
from teachdiag.scores import position_weight, quantile_normalize, teachability_scores


@pytest.mark.parametrize("k", [1, 8, 16, 32])
def test_signals_match_float64_reference(k):
    g = torch.Generator().manual_seed(k)
    P, V = 7, 300
    s = torch.randn(P, V, generator=g) * 3
    t = torch.randn(P, V, generator=g) * 3
    t[0] = s[0]  # identical distributions: every divergence is 0
    y = torch.randint(0, V, (P,), generator=g)
    got = signals_from_logits(s, t, y, k)
    assert set(got) == set(SIGNALS)
    for i in range(P):
        ref = ref_signals(s[i].numpy(), t[i].numpy(), int(y[i]), k)
        for name in SIGNALS:
            if name == "topk_entropy" and k == 1:
                assert got[name][i].item() == 0.0
                continue
            assert got[name][i].item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    assert got["fkl"][0].item() == pytest.approx(0.0, abs=1e-12)
    assert got["union_fkl"][0].item() == pytest.approx(0.0, abs=1e-12)
    assert (got["fkl"] >= -1e-12).all() and (got["rkl"] >= -1e-12).all() and (got["union_fkl"] >= -1e-12).all()
    assert ((got["compat_mass"] >= 0) & (got["compat_mass"] <= 1 + 1e-12)).all()


def test_float32_logits_give_float64_results_and_large_vocab_is_exact():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 151_000, generator=g), torch.randn(2, 151_000, generator=g)
    got = signals_from_logits(s, t, torch.tensor([3, 4]), 16)
    assert got["fkl"].dtype == torch.float64
    ref = ref_signals(s[1].numpy(), t[1].numpy(), 4, 16)
    assert got["fkl"][1].item() == pytest.approx(ref["fkl"], rel=1e-10)


def test_kl_and_entropy_match_torch_distributions():
    from torch.distributions import Categorical, kl_divergence

    a, b = torch.randn(5, 50, dtype=torch.float64), torch.randn(5, 50, dtype=torch.float64)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    torch.testing.assert_close(kl(la, lb), kl_divergence(Categorical(logits=a), Categorical(logits=b)))
    torch.testing.assert_close(entropy(la), Categorical(logits=a).entropy())


def test_kl_handles_zero_probabilities():
    log_p = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64)  # p = (1, 0)
    log_q = torch.tensor([[np.log(0.5), np.log(0.5)]], dtype=torch.float64)
    assert kl(log_p, log_q).item() == pytest.approx(np.log(2))
    assert entropy(log_p).item() == 0.0


def test_probe_losses():
    s = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 20, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    assert probe_loss(s, t, y, "reverse_kl").item() == pytest.approx(kl(ls, lt).sum().item())
    assert probe_loss(s, t, y, "forward_kl").item() == pytest.approx(kl(lt, ls).sum().item())
    # sampled_token's gradient is the policy gradient -(log pT(y) - log pS(y)) * grad log pS(y)
    probe_loss(s, t, y, "sampled_token").backward()
    s2 = s.detach().clone().requires_grad_(True)
    lp = s2.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    adv = (lt.gather(-1, y[:, None]).squeeze(-1) - lp).detach()
    (-(adv * lp).sum()).backward()
    torch.testing.assert_close(s.grad, s2.grad)
    with pytest.raises(ValueError):
        probe_loss(s, t, y, "nope")


@pytest.mark.parametrize("mode", ["full", "topk"])
@pytest.mark.parametrize("with_keep", [False, True])
def test_chunked_float64_passes_equal_one_pass(monkeypatch, one_thread, mode, with_keep):
    """A cap small enough for 3 rows a chunk (P = 11: chunks of 3, 3, 3, 2) against one chunk of
    every row: the signals, the KLs after, each loss's gradient and the row dot are bit for bit the same."""
    g = torch.Generator().manual_seed(3)
    P, V = 11, 500
    s, t = torch.randn(P, V, generator=g) * 3, torch.randn(P, V, generator=g) * 3
    y = torch.randint(0, V, (P,), generator=g)
    keep = keep_mask([i for i in range(V) if i % 7], V) if with_keep else None
    y[y % 7 == 0] += 1  # sampled tokens inside keep: sampled_token's loss stays finite

    def everything():
        out = dict(signals_from_logits(s, t, y, 16, keep, mode))
        out |= {f"{k}_after": v for k, v in kls_from_logits(s, t, keep).items()}
        out |= {f"grad_{loss}": loss_grad(s, t, y, loss, keep, divisor=P) for loss in ("reverse_kl", "forward_kl",
                                                                                   "sampled_token")}
        out["dot"] = row_dot(s, t)
        return out

    monkeypatch.setattr(signals_module, "CHUNK_BYTES", 10**12)
    assert chunk_rows(V) >= P
    whole = everything()
    monkeypatch.setattr(signals_module, "CHUNK_BYTES", 3 * signals_module.LIVE * 8 * V)
    assert chunk_rows(V) == 3
    chunked = everything()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    for loss in ("reverse_kl", "forward_kl", "sampled_token"):  # the gradient probe_loss's own backward leaves
        z = s.clone().requires_grad_(True)
        (probe_loss(z, t, y, loss, keep=keep) / P).backward()
        assert torch.equal(z.grad, chunked[f"grad_{loss}"]), loss
    assert torch.equal(chunked["dot"], (s.double() * t.double()).sum(-1))


def test_chunk_cap_at_qwen_vocabulary():
    assert chunk_rows(151_936) == 11 and chunk_rows(49_152) == 34 and chunk_rows(10**9) == 1
    assert chunk_rows(151_936) * signals_module.LIVE * 8 * 151_936 <= signals_module.CHUNK_BYTES
    empty = signals_from_logits(torch.zeros(0, 50), torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), 4)
    assert set(empty) == set(SIGNALS) and all(v.shape == (0,) for v in empty.values())


def ref_clipped_fkl(s, t, clip, temperature):
    """(P,) Σ_v min(p_T(v)·(log p_T(v) − log p_S(v)), clip) by plain float64 ops: max-shifted
    exponentials normalised by hand, no log_softmax."""
    def log_probs(z):
        z = z.double() / temperature
        z = z - z.max(-1, keepdim=True).values
        return z - torch.log(torch.exp(z).sum(-1, keepdim=True))
    ls, lt = log_probs(s), log_probs(t.detach())
    return torch.minimum(torch.exp(lt) * (lt - ls), torch.tensor(clip, dtype=torch.float64)).sum(-1)


@pytest.mark.parametrize("clip, temperature", [(0.05, 1.0), (0.05, 1.1), (0.01, 0.7), (1.0, 2.0)])
def test_clipped_fkl_matches_the_reference_with_gradients(clip, temperature):
    g = torch.Generator().manual_seed(int(clip * 100) + int(temperature * 10))
    s = (torch.randn(6, 80, generator=g) * 3).requires_grad_(True)  # float32 in, float64 out
    t = (torch.randn(6, 80, generator=g) * 3).requires_grad_(True)
    got = clipped_fkl(s, t, clip, temperature)
    assert got.dtype == torch.float64 and got.shape == (6,)
    s2 = s.detach().clone().requires_grad_(True)
    want = ref_clipped_fkl(s2, t, clip, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-9)
    assert t.grad is None  # the teacher is a fixed target
    assert s.grad.abs().sum() > 0


def test_clipped_fkl_without_a_cap_is_the_forward_kl():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 40, generator=g) * 4, torch.randn(5, 40, generator=g) * 4
    full = probe_loss(s, t, torch.zeros(5, dtype=torch.long), "forward_kl", reduce=False)
    torch.testing.assert_close(clipped_fkl(s, t, clip=math.inf), full, rtol=1e-13, atol=0)
    torch.testing.assert_close(clipped_fkl(s, t, clip=math.inf, temperature=2.0),
                               kl(F.log_softmax(t.double() / 2, -1), F.log_softmax(s.double() / 2, -1)))
    assert (clipped_fkl(s, t) <= full + 1e-15).all()  # a cap only lowers it


def test_clipped_fkl_caps_positive_entries_only():
    # p_T = (0.6, 0.3, 0.1), p_S = (0.05, 0.9, 0.05): entries 0.6·log 12 = 1.49 (capped to κ),
    # 0.3·log(1/3) = −0.33 (negative: kept as is), 0.1·log 2 = 0.069 (capped to κ = 0.05)
    pt, ps = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([[0.05, 0.9, 0.05]])
    got = clipped_fkl(ps.log(), pt.log(), clip=0.05).item()
    assert got == pytest.approx(0.05 + 0.3 * math.log(0.3 / 0.9) + 0.05, rel=1e-6)
    two_sided = (pt * (pt.log() - ps.log())).double().clamp(-0.05, 0.05).sum().item()
    assert got < two_sided - 0.2  # clamping from below too would have lifted the −0.33


def test_clipped_fkl_lives_on_the_kept_ids():
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(4, 30, generator=g) * 3).requires_grad_(True)
    t = torch.randn(4, 30, generator=g) * 3
    keep = torch.ones(30, dtype=torch.bool)
    keep[[2, 7, 29]] = False
    got = clipped_fkl(s, t, 0.05, 1.1, keep=keep)
    torch.testing.assert_close(got, ref_clipped_fkl(s[:, keep], t[:, keep], 0.05, 1.1), rtol=1e-12, atol=1e-14)
    got.sum().backward()
    assert (s.grad[:, ~keep] == 0).all() and (s.grad[:, keep] != 0).any()


def test_position_weight_by_hand_at_the_paper_defaults():
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert position_weight(0, 10) == pytest.approx(0.25 + 0.75 * sigma(-2.5), rel=1e-15)  # frac 0.05
    assert position_weight(1, 5) == pytest.approx(0.625, rel=1e-15)  # frac 1.5/5 = τ: halfway up
    assert position_weight(9, 10) == pytest.approx(0.25 + 0.75 * sigma(6.5), rel=1e-15)  # frac 0.95
    w = position_weight(np.arange(200), 200)
    assert (np.diff(w) > 0).all() and (w > 0.25).all() and (w < 1).all()
    # vectorised over both arguments; the same t counts for less in a longer response
    np.testing.assert_array_equal(position_weight(np.array([3, 3]), np.array([4, 40])),
                                  [position_weight(3, 4), position_weight(3, 40)])
    assert position_weight(3, 40) < position_weight(3, 4)
    assert position_weight(0, 1, w_min=1.0) == 1.0  # w_min = 1: no weighting
    # scale 0 is a step (the paper's code floors it at 1e-6): w_min before τ, 1 after
    assert position_weight(np.array([0, 9]), 10, scale=0.0).tolist() == [0.25, 1.0]
    assert position_weight(4, 10, w_min=0.0, tau=0.5, scale=0.2) == pytest.approx(sigma(-0.25))


def test_quantile_normalize_definition():
    x = np.arange(101, dtype=float)  # q05 = 5, q95 = 95
    got = quantile_normalize(x)
    assert got[5] == 0.0 and got[95] == 1.0 and got[0] == 0.0 and got[100] == 1.0
    assert got[50] == pytest.approx(45 / 90)
    assert (quantile_normalize(np.full(10, 3.0)) == 0).all()  # q95 == q05
    with_nan = quantile_normalize(np.array([1.0, np.nan, 2.0, 3.0]))
    assert np.isnan(with_nan[1]) and np.isfinite(with_nan[[0, 2, 3]]).all()


def linear_quantile(values, p: float) -> float:
    """numpy's default ('linear') quantile, by hand: sort, then interpolate at h = (n − 1)·p."""
    s = sorted(values)
    h = (len(s) - 1) * p
    lo = int(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


# D sorted is 0, 10, ..., 100 (n = 11): h = 10·0.05 = 0.5 → q05 = 5, h = 9.5 → q95 = 95, so D̃ = (D − 5)/90.
# C sorted is 0, 0.1, ..., 1: q05 = 0.05, q95 = 0.95, so C̃ = (C − 0.05)/0.9. Rows in a shuffled order.
D = np.array([50, 0, 100, 10, 90, 20, 80, 30, 70, 40, 60], dtype=float)
C = np.array([0.5, 1.0, 0.0, 0.3, 0.7, 0.1, 0.9, 0.2, 0.6, 0.4, 0.8])


def test_hand_quantile_agrees_with_the_planted_values():
    assert linear_quantile(D, 0.05) == 5.0 and linear_quantile(D, 0.95) == 95.0
    assert linear_quantile(C, 0.05) == pytest.approx(0.05, abs=1e-15)
    assert linear_quantile(C, 0.95) == pytest.approx(0.95, abs=1e-15)


def test_quantile_normalize_planted():
    got = quantile_normalize(D)
    # by hand: 50 → 45/90, 0 and 100 clip to 0 and 1, 10 → 5/90, 90 → 85/90 ...
    want = [0.5, 0.0, 1.0, 5 / 90, 85 / 90, 15 / 90, 75 / 90, 25 / 90, 65 / 90, 35 / 90, 55 / 90]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(quantile_normalize(C), [0.5, 1.0, 0.0, 0.25 / 0.9, 0.65 / 0.9, 0.05 / 0.9,
                                                       0.85 / 0.9, 0.15 / 0.9, 0.55 / 0.9, 0.35 / 0.9, 0.75 / 0.9],
                               rtol=1e-12, atol=1e-15)


def test_teachability_and_incompat_planted():
    teach, incompat = teachability_scores(D, C)
    # row 0: D̃ = 0.5, C̃ = 0.5 → 0.25 and 0.25
    # row 1: D̃ = 0 (clipped) → 0 and 0 whatever C is
    # row 2: D̃ = 1 (clipped), C̃ = 0 (clipped) → 0 and 1
    # row 4: D̃ = 85/90, C̃ = 0.65/0.9 → 85·0.65/81 and 85·0.25/81
    # row 6: D̃ = 75/90, C̃ = 0.85/0.9 → 75·0.85/81 and 75·0.05/81
    for i, t, inc in ((0, 0.25, 0.25), (1, 0.0, 0.0), (2, 0.0, 1.0), (4, 85 * 0.65 / 81, 85 * 0.25 / 81),
                      (6, 75 * 0.85 / 81, 75 * 0.05 / 81)):
        assert teach[i] == pytest.approx(t, rel=1e-12, abs=1e-15), i
        assert incompat[i] == pytest.approx(inc, rel=1e-12, abs=1e-15), i
    assert ((teach >= 0) & (teach <= 1) & (incompat >= 0) & (incompat <= 1)).all()


def test_quantile_normalize_against_the_hand_quantile():
    x = np.random.default_rng(0).exponential(size=203)  # n − 1 = 202: h is never an integer
    q05, q95 = linear_quantile(x, 0.05), linear_quantile(x, 0.95)
    want = [min(max((v - q05) / (q95 - q05), 0.0), 1.0) for v in x]
    np.testing.assert_allclose(quantile_normalize(x), want, rtol=1e-12, atol=1e-15)
    assert (quantile_normalize(x) == 0).sum() == 11 and (quantile_normalize(x) == 1).sum() == 11  # clipped tails


def test_equal_quantiles_give_zero():
    # 19 sevens between −100 and 100 (n = 21): h = 1 and h = 19 both land on a 7, so q05 = q95 = 7
    x = np.array([7.0] * 10 + [-100.0, 100.0] + [7.0] * 9)
    assert linear_quantile(x, 0.05) == linear_quantile(x, 0.95) == 7.0
    assert (quantile_normalize(x) == 0).all()  # the outliers too: no range to normalise by
    teach, incompat = teachability_scores(x, C.tolist() + C[:10].tolist())
    assert (teach == 0).all() and (incompat == 0).all()
    _, incompat = teachability_scores(D, np.full(11, 0.3))  # C̃ = 0 everywhere: incompat = D̃
    np.testing.assert_allclose(incompat, quantile_normalize(D))


def test_nan_rows_stay_nan_and_do_not_move_the_quantiles():
    d = np.insert(D, [3, 7], np.nan)  # two NaN rows among the eleven planted ones
    c = np.insert(C, [3, 7], np.nan)
    got = quantile_normalize(d)
    assert np.isnan(got[[3, 8]]).all()
    np.testing.assert_allclose(np.delete(got, [3, 8]), quantile_normalize(D), rtol=0, atol=0)  # q over finite
    teach, incompat = teachability_scores(d, c)
    assert np.isnan(teach[[3, 8]]).all() and np.isnan(incompat[[3, 8]]).all()
    assert teach[0] == pytest.approx(0.25) and incompat[0] == pytest.approx(0.25)  # planted rows unchanged
    assert teach[2] == 0.0 and incompat[2] == 1.0
    # a NaN compat_mass makes that row's scores NaN, not 0
    teach, incompat = teachability_scores(D, np.where(np.arange(11) == 4, np.nan, C))
    assert np.isnan(teach[4]) and np.isnan(incompat[4]) and np.isfinite(np.delete(teach, 4)).all()
    assert np.isnan(quantile_normalize(np.full(4, np.nan))).all()
