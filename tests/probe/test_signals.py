"""Signals against an independent float64 NumPy reference, plus their basic properties."""

import numpy as np
import pytest
import torch

from reference import ref_signals
from teachdiag.probe.signals import SIGNALS, entropy, kl, probe_loss, signals_from_logits
from teachdiag.table import quantile_normalize, teachability_scores


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


def test_quantile_normalize_definition():
    x = np.arange(101, dtype=float)  # q05 = 5, q95 = 95
    got = quantile_normalize(x)
    assert got[5] == 0.0 and got[95] == 1.0 and got[0] == 0.0 and got[100] == 1.0
    assert got[50] == pytest.approx(45 / 90)
    assert (quantile_normalize(np.full(10, 3.0)) == 0).all()  # q95 == q05
    with_nan = quantile_normalize(np.array([1.0, np.nan, 2.0, 3.0]))
    assert np.isnan(with_nan[1]) and np.isfinite(with_nan[[0, 2, 3]]).all()


def test_teachability_is_d_times_c():
    rng = np.random.default_rng(0)
    d, c = rng.exponential(size=200), rng.uniform(size=200)
    teach, incompat = teachability_scores(d, c)
    dn, cn = quantile_normalize(d), quantile_normalize(c)
    np.testing.assert_allclose(teach, dn * cn)
    np.testing.assert_allclose(incompat, dn * (1 - cn))
    np.testing.assert_allclose(teach + incompat, dn)
