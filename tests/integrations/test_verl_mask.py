"""The verl response_mask on verl's tensor layout (no verl installed): top-K tensors built as
verl.trainer.distillation builds them (the teacher at the sorted union of both top-Ks, a repeated
id -inf), nested over whole sequences and cut to the right-padded responses as verl cuts them, and a
mask whose count token-mean aggregation (core_algos.agg_loss) can divide by."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from teachdiag.errors import InputError
from teachdiag.integrations.verl import (Selection, response_mask_from_logits, response_mask_from_topk,
                                         response_slice, teacher_at_student_ids)
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


def test_every_sample_keeps_a_trainable_position_so_the_token_mean_has_a_denominator():
    """agg_loss's token-mean divides by the mask's count: the mask stays inside the loss mask, and the
    released rule's fill keeps one position of every sample that has a trainable one, beyond the budget."""
    s, t, response_mask = batch(3)
    loss_mask = response_mask.clone()
    loss_mask[1] = 0
    loss_mask[1, 2] = 1  # sample 1: one trainable position (the rest e.g. tool output)
    mask, metrics = response_mask_from_logits(s, t, response_mask, Selection(budget=0.05, top_k=K), loss_mask)
    assert not (mask.bool() & ~loss_mask.bool()).any() and mask[1, 2] == 1
    assert (mask.sum(1) >= 1).all() and mask.sum() > math.ceil(0.05 * loss_mask.sum())
    assert metrics["ta_opd/kept"] == mask.sum() and metrics["ta_opd/positions"] == loss_mask.sum()


def test_teacher_at_the_student_ids_in_chunks_equals_the_whole_comparison():
    s, t, response_mask = batch(4)
    _, s_lp, s_ids, t_lp, t_ids = verl_stages(s, t)
    on = response_mask.bool()
    s_ids, t_ids, t_lp = s_ids[on], t_ids[on], t_lp[on]  # (N, K), (N, 2K): repeated ids are -inf
    same = (s_ids[:, :, None] == t_ids[:, None, :]) & torch.isfinite(t_lp)[:, None, :]  # (N, K, 2K) at once
    whole = torch.where(same, t_lp[:, None, :], -math.inf).amax(-1)
    assert torch.isfinite(whole).all()  # verl's union holds every student id
    for chunk in (1, 3, len(s_ids), 10**6):
        assert torch.equal(teacher_at_student_ids(s_ids, t_ids, t_lp, chunk=chunk), whole)
    t_lp = t_lp.clone()
    t_lp[0] = -math.inf  # a position the teacher gave nothing for
    assert torch.isinf(teacher_at_student_ids(s_ids, t_ids, t_lp, chunk=2)[0]).all()


PROMPT_LENGTHS = (3, 5, 2)  # left padding to 5 before each prompt


def verl_batch(seed: int = 0, k: int = K):
    """A driver batch as verl holds it: prompts left-padded, responses right-padded, and the stage
    tensors nested over each unpadded prompt + response (entry i predicting token i + 1), with the
    (B, T, V) logits the response positions were made from."""
    s, t, response_mask = batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    width = max(PROMPT_LENGTHS)
    attention = torch.zeros(B, width + T, dtype=torch.long)
    seq_s, seq_t = [], []
    for b, (p, r) in enumerate(zip(PROMPT_LENGTHS, LENGTHS)):
        attention[b, width - p : width + r] = 1
        z_s, z_t = 3 * torch.randn(p + r, V, generator=g), 3 * torch.randn(p + r, V, generator=g)
        # entry p − 1 + j predicts response token j
        z_s[p - 1 : p - 1 + r], z_t[p - 1 : p - 1 + r] = s[b, :r], t[b, :r]
        seq_s.append(z_s)
        seq_t.append(z_t)
    _, s_lp, s_ids, t_lp, t_ids = verl_stages(torch.cat(seq_s)[None], torch.cat(seq_t)[None], k)  # (1, Σ L, ·)
    offsets = torch.tensor([0, *torch.tensor([p + r for p, r in zip(PROMPT_LENGTHS, LENGTHS)]).cumsum(0).tolist()])
    nest = lambda x: torch.nested.nested_tensor_from_jagged(x[0], offsets)  # noqa: E731
    data = {"prompts": torch.zeros(B, width, dtype=torch.long), "responses": torch.zeros(B, T, dtype=torch.long),
            "attention_mask": attention, "response_mask": response_mask, "loss_mask": response_mask.clone(),
            "old_log_prob_topk_log_probs": nest(s_lp), "old_log_prob_topk_indices": nest(s_ids),
            "ref_log_prob_topk_log_probs": nest(t_lp), "ref_log_prob_topk_indices": nest(t_ids)}
    return data, s, t


def test_response_slice_cuts_nested_stage_tensors_to_the_response():
    data, s, t = verl_batch()
    _, s_lp, s_ids, t_lp, t_ids = verl_stages(s, t)  # the same tensors, made at the response positions
    on = data["response_mask"].bool()
    for key, want in (("old_log_prob_topk_log_probs", s_lp), ("old_log_prob_topk_indices", s_ids),
                      ("ref_log_prob_topk_log_probs", t_lp), ("ref_log_prob_topk_indices", t_ids)):
        got = response_slice(data[key], data["attention_mask"], data["prompts"].shape[1])
        assert got.shape == want.shape and torch.equal(got[on], want[on]) and (got[~on] == 0).all(), key
        assert response_slice(want, data["attention_mask"], data["prompts"].shape[1]) is want  # sliced already
    with pytest.raises(InputError, match="tokens"):  # one token short of what the attention mask holds
        response_slice(data["old_log_prob_topk_indices"].values()[1:], data["attention_mask"], max(PROMPT_LENGTHS))
