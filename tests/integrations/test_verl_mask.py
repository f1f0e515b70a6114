"""The verl response_mask on verl's tensor layout (no verl installed): top-K tensors built as
verl.trainer.distillation builds them (the teacher at the sorted union of both top-Ks, a repeated
id -inf), right-padded responses, and token-mean aggregation as core_algos.agg_loss computes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teachdiag.integrations.verl import Selection, response_mask_from_logits, response_mask_from_topk
from teachdiag.selectors import ta_opd_mask

B, T, V, K = 3, 7, 50, 4
LENGTHS = (7, 4, 5)  # right padding after each response


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, t = 3 * torch.randn(B, T, V, generator=g), 3 * torch.randn(B, T, V, generator=g)
    response_mask = torch.zeros(B, T, dtype=torch.long)  # verl keeps masks as integers
    for b, n in enumerate(LENGTHS):
        response_mask[b, :n] = 1
    return s, t, response_mask


def verl_topk(logprobs: torch.Tensor, k: int, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's topk_logprobs_from_logits on log-probabilities: [at the given ids,] then the own top-k;
    with 2k of them, sorted by id and a repeated id's log-probability -inf."""
    lps, ids = [], []
    if at is not None:
        lps.append(logprobs.gather(-1, at))
        ids.append(at)
    own_lp, own_ids = logprobs.topk(k, dim=-1)
    lps.append(own_lp)
    ids.append(own_ids)
    lp, idx = torch.cat(lps, -1), torch.cat(ids, -1)
    if idx.shape[-1] == 2 * k:
        idx, order = idx.sort(-1)
        lp = lp.gather(-1, order)
        dupe = F.pad(idx.diff(dim=-1), (0, 1), value=1).eq(0)
        lp = lp.masked_fill(dupe, float("-inf"))
    return lp, idx


def verl_stages(s: torch.Tensor, t: torch.Tensor, k: int = K):
    """The student's own top-k (old_log_prob stage) and the teacher at the union (ref_log_prob stage),
    from float64 log-probabilities (verl stores float32; float64 here so masks compare exactly)."""
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    s_lp, s_ids = verl_topk(ls, k)
    t_lp, t_ids = verl_topk(lt, k, at=s_ids)
    return ls, s_lp, s_ids, t_lp, t_ids


@pytest.mark.parametrize("selector", ["teachability", "entropy", "divergence", "tip", "random"])
def test_driver_stage_tensors_give_ta_opd_mask_with_exact_c(selector):
    s, t, response_mask = batch()
    _, s_lp, s_ids, t_lp, t_ids = verl_stages(s, t)
    sel = Selection(selector=selector, budget=0.2, top_k=K)
    mask, metrics = response_mask_from_topk(s_lp, s_ids, t_lp, t_ids, response_mask, sel)
    expected = ta_opd_mask(s, t, response_mask, budget=0.2, selector=selector, k=K, signals="topk")
    assert mask.dtype == response_mask.dtype and torch.equal(mask.bool(), expected)
    assert metrics["ta_opd/kept"] == expected.sum() and metrics["ta_opd/positions"] == sum(LENGTHS)


def test_loss_inputs_at_the_shared_union_give_the_same_mask():
    s, t, response_mask = batch(1)
    ls, _, _, t_lp, t_ids = verl_stages(s, t)
    s_at_union = ls.gather(-1, t_ids).masked_fill(~torch.isfinite(t_lp), float("-inf"))  # the actor-update stage
    mask, _ = response_mask_from_topk(s_at_union, t_ids, t_lp, t_ids, response_mask, Selection(budget=0.2, top_k=K))
    assert torch.equal(mask.bool(), ta_opd_mask(s, t, response_mask, budget=0.2, k=K, signals="topk"))


def test_topk_lb_and_logits_and_loss_mask():
    s, t, response_mask = batch(2)
    _, s_lp, s_ids, t_lp, t_ids = verl_stages(s, t)
    lb = Selection(budget=0.2, top_k=K, signals="topk_lb")
    mask, _ = response_mask_from_topk(s_lp, s_ids, t_lp, t_ids, response_mask, lb)
    assert torch.equal(mask.bool(), ta_opd_mask(s, t, response_mask, budget=0.2, k=K, signals="topk_lb"))

    loss_mask = response_mask.clone()
    loss_mask[0, 2:5] = 0  # e.g. tool output: never kept, still normalised over
    full, _ = response_mask_from_logits(s, t, response_mask, Selection(budget=0.3, top_k=K), loss_mask)
    expected = ta_opd_mask(s, t, response_mask, budget=0.3, k=K, loss_mask=loss_mask)
    assert torch.equal(full.bool(), expected) and not full[0, 2:5].any()


def test_token_mean_over_the_new_response_mask_is_the_kept_mean():
    """core_algos.agg_loss, token-mean: masked_sum(loss_mat, mask) / (batch_num_tokens · dp_size), with
    batch_num_tokens the mask's sum over the data-parallel group (one rank here)."""
    s, t, response_mask = batch(3)
    mask, _ = response_mask_from_logits(s, t, response_mask, Selection(budget=0.2, top_k=K))
    loss_mat = torch.rand(B, T, generator=torch.Generator().manual_seed(4))
    token_mean = (loss_mat * mask).sum() / (mask.sum() * 1 + 1e-8)
    kept = mask.bool()
    assert token_mean.item() == pytest.approx(loss_mat[kept].mean().item(), rel=1e-6)
    assert 0 < kept.sum() < response_mask.sum()
