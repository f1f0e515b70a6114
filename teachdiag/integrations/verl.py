"""TA-OPD for verl: the kept positions as verl's response_mask, which its loss masks with and its
token-mean denominator counts.

    from teachdiag.integrations.verl import Selection, response_mask_from_topk, response_mask_from_logits
    # in the driver, after the teacher's top-K log-probabilities are in the batch, before update_actor:
    mask, metrics = response_mask_from_topk(
        student_logprobs=old_topk_logprobs, student_ids=old_topk_indices,     # (B, T, K): the student's top-K
        teacher_logprobs=ref_topk_logprobs, teacher_ids=ref_topk_indices,     # (B, T, 2K): teacher at the union
        response_mask=batch.batch["response_mask"], selection=Selection(budget=0.05))
    batch.batch["response_mask"] = mask          # and batch.batch["loss_mask"], where the batch has one
    # with full logits at hand instead: mask, metrics = response_mask_from_logits(s_logits, t_logits, response_mask)

verl's conventions, as read in volcengine/verl for this module (no verl is imported here):
- verl.trainer.ppo.core_algos.agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, ...):
  loss_mat and loss_mask are (B, response_length), responses right-padded; "token-mean" is
  masked_sum(loss_mat, loss_mask) / (batch_num_tokens · dp_size), and the engines' forward_backward_batch
  sets batch_num_tokens to the sum of the batch's loss_mask (or response_mask) over the data-parallel
  group. So a response_mask holding only the kept positions masks the loss and makes the denominator
  the global kept count: the TA-OPD loss, normalised by the kept positions.
- verl.trainer.distillation (the top-K distillation losses): the student's own top-K
  (stage old_log_prob: old_log_prob_topk_log_probs / _indices, (tokens, K)); the teacher's
  log-probabilities at the union of the student's top-K and its own top-K (stage ref_log_prob:
  ref_log_prob_topk_log_probs / _indices, (tokens, 2K), ids sorted, a repeated id's log-probability
  -inf), full-vocabulary log_softmax values; the losses get both sides at those same 2K ids
  (DistillationLossInputs.student_topk_logprobs / teacher_topk_logprobs / *_topk_indices), sliced to
  the response as (B, response_length, 2K).

From such tensors the student's list is the top K of its log-probabilities, the teacher's list the
top K of its own, and C the teacher's mass at the student's ids, exact when the teacher's ids hold
them all (verl's union does). H, D, C are then probe/topk.served_signals, and the rule runs over the
batch given (integrations/select.py): pass the whole rollout batch, not a micro-batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from teachdiag.integrations.select import Selection, selection_stats
from teachdiag.probe.topk import served_signals
from teachdiag.selectors import response_signals

__all__ = ["Selection", "response_mask_from_logits", "response_mask_from_topk"]


def _rows(response_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(N, 2) the response positions in row-major order, and their sample / position / response_length."""
    on = response_mask.bool()  # (B, T)
    where = on.nonzero(as_tuple=False)
    rows = {"sample": where[:, 0].cpu().numpy(),
            "position": (on.long().cumsum(1) - 1)[where[:, 0], where[:, 1]].cpu().numpy(),
            "response_length": on.sum(1)[where[:, 0]].cpu().numpy()}
    return where, rows


def _mask(sig: dict, where: torch.Tensor, response_mask: torch.Tensor, loss_mask: torch.Tensor | None,
          sel: Selection) -> tuple[torch.Tensor, dict[str, float]]:
    """The selection as a mask of response_mask's shape and dtype, and its metrics for verl's logger."""
    valid = None if loss_mask is None else loss_mask.bool()[where[:, 0], where[:, 1]].cpu().numpy()
    keep = sel.keep(sig, valid)
    stats = selection_stats(sig, keep, valid, sel)
    mask = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    mask[where[:, 0], where[:, 1]] = torch.from_numpy(keep).to(mask.device)
    return mask.to(response_mask.dtype), {f"ta_opd/{k}": float(v) for k, v in stats.items()}


def response_mask_from_topk(student_logprobs: torch.Tensor, student_ids: torch.Tensor,
                            teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                            response_mask: torch.Tensor, selection: Selection | None = None,
                            loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(mask, metrics): the kept positions as a (B, T) mask of response_mask's dtype, and
    ta_opd/kept, ta_opd/positions, ... for verl's metrics dict.

    student_logprobs, student_ids: (B, T, Ks) the student's log-probabilities at some ids, its own
    top-K among them; teacher_logprobs, teacher_ids: (B, T, Kt) the teacher's, its own top-K among
    them (verl's 2K union); -inf entries (verl's repeated ids) are dropped. response_mask: (B, T),
    nonzero on response tokens; loss_mask: (B, T) or None, the positions the loss may train on.
    K = selection.top_k; selection.signals "topk_lb" ignores the teacher at the student's ids."""
    sel = selection or Selection()
    where, rows = _rows(response_mask)
    pick = lambda x: x[where[:, 0], where[:, 1]]  # noqa: E731  (N, ·) at the response positions
    s_all, t_all = pick(student_logprobs).double(), pick(teacher_logprobs).double()
    s_ids_all, t_ids_all = pick(student_ids).long(), pick(teacher_ids).long()
    k = min(sel.top_k, s_all.shape[-1], t_all.shape[-1])
    s_lp, j = s_all.topk(k, dim=-1)  # (N, K) the student's list, best first
    t_lp, i = t_all.topk(k, dim=-1)
    s_ids, t_ids = s_ids_all.gather(-1, j), t_ids_all.gather(-1, i)
    t_at_s = None
    if sel.signals == "topk":  # the teacher at each of the student's ids, -inf where it was not given
        same = (s_ids[:, :, None] == t_ids_all[:, None, :]) & torch.isfinite(t_all)[:, None, :]  # (N, K, Kt)
        t_at_s = torch.where(same, t_all[:, None, :], -math.inf).amax(-1)
    sig = {name: v.cpu().numpy() for name, v in served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s).items()}
    return _mask(sig | rows, where, response_mask, loss_mask, sel)


def response_mask_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              response_mask: torch.Tensor, selection: Selection | None = None,
                              loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """response_mask_from_topk's (mask, metrics) from (B, T, V) logits at the response positions
    (selectors.ta_opd_mask's selection, H, D, C by selection.signals)."""
    sel = selection or Selection()
    sig = response_signals(student_logits, teacher_logits, response_mask, sel.top_k, signals=sel.signals)
    where, _ = _rows(response_mask)
    return _mask(sig, where, response_mask, loss_mask, sel)
