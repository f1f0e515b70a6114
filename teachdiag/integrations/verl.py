"""TA-OPD for verl: the kept positions as verl's response_mask, which its loss masks with and its
token-mean denominator counts.

    from teachdiag.integrations.verl import Selection, response_mask_from_topk, response_slice
    # in the driver, after the teacher's top-K log-probabilities are in the batch, before update_actor:
    b = batch.batch
    response = lambda key: response_slice(b[key], b["attention_mask"], b["prompts"].shape[1])  # (B, T, ·)
    mask, metrics = response_mask_from_topk(
        response("old_log_prob_topk_log_probs"), response("old_log_prob_topk_indices"),  # the student's top-K
        response("ref_log_prob_topk_log_probs"), response("ref_log_prob_topk_indices"),  # teacher at the union
        b["response_mask"], selection=Selection(budget=0.05))
    b["response_mask_full"], b["response_mask"] = b["response_mask"], mask   # and b["loss_mask"], where present
    # with full logits at hand instead: mask, metrics = response_mask_from_logits(s_logits, t_logits, response_mask)

verl's conventions, as read in volcengine/verl for this module (no verl is imported here):
- verl.trainer.ppo.core_algos.agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, ...):
  loss_mat and loss_mask are (B, response_length), responses right-padded; "token-mean" is
  masked_sum(loss_mat, loss_mask) / (batch_num_tokens · dp_size), and the engine workers'
  forward_backward_batch sets batch_num_tokens to the sum of the batch's loss_mask (or
  response_mask) over the data-parallel group. So a response_mask holding only the kept positions
  masks the loss and makes the denominator the global kept count: the TA-OPD loss, normalised by
  the kept positions. The legacy worker (workers/actor/dp_actor, DataParallelPPOActor) instead
  takes the token-mean within each micro-batch and weighs micro-batches by their rows, so there
  each micro-batch's loss is divided by its own kept count.
- verl.trainer.distillation (the top-K distillation losses): the student's own top-K
  (stage old_log_prob: old_log_prob_topk_log_probs / _indices, (tokens, K)); the teacher's
  log-probabilities at the union of the student's top-K and its own top-K (stage ref_log_prob:
  ref_log_prob_topk_log_probs / _indices, (tokens, 2K), ids sorted, a repeated id's log-probability
  -inf), full-vocabulary log_softmax values. These are nested (jagged) tensors over each unpadded
  prompt + response, entry i predicting token i + 1; verl slices them to the response
  (workers/utils/padding._slice_response_from_unpad_output) before the loss, and response_slice
  does the same here.
- Replacing response_mask changes everything else that reads it after the swap: the whole actor
  loss of that update is masked to the kept positions (a policy-gradient or entropy term as well as
  the distillation one), the advantage estimators if they run later, and compute_data_metrics'
  critic/advantages, returns and values statistics (its response_length/* read attention_mask and
  stay as they were). So swap right before update_actor, keep the original under another key
  (response_mask_full above) and put it back afterwards for whatever reads it next.

From such tensors the student's list is the top K of its log-probabilities, the teacher's list the
top K of its own, and C the teacher's mass at the student's ids, exact when the teacher's ids hold
them all (verl's union does). H, D, C are then probe/topk.served_signals, and the rule runs over the
batch given (integrations/select.py): pass the whole rollout batch, not a micro-batch. Memory: the
response rows of the four inputs as float64 / int64, N·(Ks + Kt)·16 bytes for N response tokens
(~2 GB at N = 4M, K = 16), plus teacher_at_student_ids' comparison, `chunk` rows at a time.
"""

from __future__ import annotations

import math

import torch

from teachdiag.errors import InputError
from teachdiag.integrations.select import Selection, response_rows, selection_stats
from teachdiag.probe.topk import served_signals
from teachdiag.selectors import response_signals

__all__ = ["Selection", "response_mask_from_logits", "response_mask_from_topk", "response_slice",
           "teacher_at_student_ids"]


def response_slice(tensor: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, response_length, ·): the response rows of a verl stage tensor held over whole sequences,
    right-padded with 0, as verl's _slice_response_from_unpad_output cuts them before its loss.

    tensor: nested (jagged) over B unpadded prompt + response sequences, (L_b, ·) each (or its
    (Σ L_b, ·) values), entry i predicting token i + 1; a (B, response_length, ·) tensor, already
    sliced, comes back as it is. attention_mask: (B, prompt_width + response_length), the batch's
    left-padded prompts then right-padded responses; prompt_width: batch["prompts"].shape[1]."""
    width = attention_mask.shape[1] - prompt_width  # response_length
    if not tensor.is_nested and tensor.dim() == 3 and tensor.shape[:2] == (attention_mask.shape[0], width):
        return tensor
    values = tensor.values() if tensor.is_nested else tensor  # (Σ L_b, ·)
    prompt_lens = attention_mask[:, :prompt_width].sum(1)
    response_lens = attention_mask[:, prompt_width:].sum(1)
    ends = (prompt_lens + response_lens).cumsum(0)  # where each sequence ends in `values`
    if int(ends[-1]) != values.shape[0]:
        raise InputError(f"holds {values.shape[0]} tokens, the attention mask {int(ends[-1])}", field="topk tensor")
    out = values.new_zeros((attention_mask.shape[0], width, *values.shape[1:]))
    for b, (r, end) in enumerate(zip(response_lens.tolist(), ends.tolist())):
        out[b, :r] = values[end - r - 1 : end - 1]  # the token before each response token predicts it
    return out


def teacher_at_student_ids(s_ids: torch.Tensor, t_ids: torch.Tensor, t_lp: torch.Tensor,
                           chunk: int = 4096) -> torch.Tensor:
    """(N, K) the teacher's log-probability at each of the student's ids s_ids (N, K), from its
    log-probabilities t_lp at ids t_ids (N, Kt); -inf where it was not given or given as -inf
    (verl's repeated ids). Compared `chunk` rows at a time: all N at once would hold an (N, K, Kt)
    bool and float64 pair, ~19 GB at N = 4M, K = 16, Kt = 32; a chunk of 4096 holds ~19 MB."""
    out = torch.full(s_ids.shape, -math.inf, dtype=t_lp.dtype, device=t_lp.device)
    for a in range(0, s_ids.shape[0], chunk):
        s, t, lp = s_ids[a : a + chunk], t_ids[a : a + chunk], t_lp[a : a + chunk]
        same = (s[:, :, None] == t[:, None, :]) & torch.isfinite(lp)[:, None, :]  # (c, K, Kt)
        out[a : a + chunk] = torch.where(same, lp[:, None, :], -math.inf).amax(-1)
    return out


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
    where, rows = response_rows(response_mask)  # (N, 2)
    pick = lambda x: x[where[:, 0], where[:, 1]]  # noqa: E731  (N, ·) at the response positions
    s_all, t_all = pick(student_logprobs).double(), pick(teacher_logprobs).double()
    s_ids_all, t_ids_all = pick(student_ids).long(), pick(teacher_ids).long()
    k = min(sel.top_k, s_all.shape[-1], t_all.shape[-1])
    s_lp, j = s_all.topk(k, dim=-1)  # (N, K) the student's list, best first
    t_lp, i = t_all.topk(k, dim=-1)
    s_ids, t_ids = s_ids_all.gather(-1, j), t_ids_all.gather(-1, i)
    t_at_s = teacher_at_student_ids(s_ids, t_ids_all, t_all) if sel.signals == "topk" else None
    sig = {name: v.cpu().numpy() for name, v in served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s).items()}
    return _mask(sig | rows, where, response_mask, loss_mask, sel)


def response_mask_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              response_mask: torch.Tensor, selection: Selection | None = None,
                              loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """response_mask_from_topk's (mask, metrics) from (B, T, V) logits at the response positions
    (selectors.ta_opd_mask's selection, H, D, C by selection.signals)."""
    sel = selection or Selection()
    sig = response_signals(student_logits, teacher_logits, response_mask, sel.top_k, signals=sel.signals)
    where, _ = response_rows(response_mask)
    return _mask(sig, where, response_mask, loss_mask, sel)
