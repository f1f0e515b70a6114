"""Per-position signals (DESIGN §3) as pure functions over logits, in nats.

    from teachdiag.probe.signals import signals_from_logits, probe_loss
    s = signals_from_logits(student_logits, teacher_logits, token_ids, k=16)   # dict of (P,)
    s["fkl"], s["compat_mass"], s["union_fkl"], ...

teachability and incompat need the whole run's quantiles, so they live in table.py.

Logits are (P, V) over the shared vocabulary (padded rows already dropped). All arithmetic
is done in float64: gains are differences of two KLs that agree to ~1e-4, so float32 sums
over a 150k vocabulary would leave too few correct digits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGNALS = ("fkl", "rkl", "student_entropy", "teacher_entropy", "student_logprob",
           "teacher_logprob", "compat_mass", "topk_entropy", "union_fkl")
LOSSES = ("reverse_kl", "forward_kl", "sampled_token")


def kl(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) along the last dim from log-probabilities; 0·log 0 counts as 0, NaN stays NaN.
    p: log_p.exp() when the caller has it already (a (P, V) float64 exp is not free)."""
    p = log_p.exp() if p is None else p
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)


def entropy(log_p: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy along the last dim, nats."""
    p = log_p.exp() if p is None else p
    return -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)


def signals_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        token_ids: torch.Tensor, k: int = 16) -> dict[str, torch.Tensor]:
    """Every DESIGN §3 signal that needs no run-level normalisation.

    student_logits, teacher_logits: (P, V); token_ids: (P,) the sampled tokens y_j.
    Returns float64 tensors of shape (P,) on the logits' device.
    """
    log_s = F.log_softmax(student_logits.double(), -1)  # (P, V)
    log_t = F.log_softmax(teacher_logits.double(), -1)  # (P, V)
    y = token_ids.long().view(-1, 1)
    k = min(k, log_s.shape[-1])
    top_s = log_s.topk(k, dim=-1).indices  # (P, K) the student's candidates
    top_t = log_t.topk(k, dim=-1).indices  # (P, K)

    # H: entropy of p_S renormalised over its own top-K, scaled to [0, 1] by log K
    log_sk = F.log_softmax(log_s.gather(-1, top_s), -1)
    topk_entropy = entropy(log_sk) / math.log(k) if k > 1 else torch.zeros_like(log_sk[:, 0])

    # D: forward KL with both distributions renormalised over U = topK(p_S) ∪ topK(p_T)
    union = torch.zeros_like(log_s, dtype=torch.bool)
    union.scatter_(-1, top_s, True).scatter_(-1, top_t, True)
    neg_inf = torch.tensor(float("-inf"), dtype=log_s.dtype, device=log_s.device)
    log_su = F.log_softmax(torch.where(union, log_s, neg_inf), -1)
    log_tu = F.log_softmax(torch.where(union, log_t, neg_inf), -1)
    union_fkl = kl(log_tu, log_su)  # outside U both are -inf: p = 0 there, which kl counts as 0

    p_s, p_t = log_s.exp(), log_t.exp()
    return {
        "fkl": kl(log_t, log_s, p_t),
        "rkl": kl(log_s, log_t, p_s),
        "student_entropy": entropy(log_s, p_s),
        "teacher_entropy": entropy(log_t, p_t),
        "student_logprob": log_s.gather(-1, y).squeeze(-1),
        "teacher_logprob": log_t.gather(-1, y).squeeze(-1),
        "compat_mass": p_t.gather(-1, top_s).sum(-1),  # C: teacher mass on student top-K
        "topk_entropy": topk_entropy,
        "union_fkl": union_fkl,
    }


def kls_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Only fkl and rkl, (P,) float64, by the same arithmetic as signals_from_logits: what a
    re-scored student needs after a step (the rest of the signals come from θ0)."""
    log_s = F.log_softmax(student_logits.double(), -1)
    log_t = F.log_softmax(teacher_logits.double(), -1)
    return {"fkl": kl(log_t, log_s), "rkl": kl(log_s, log_t)}


def probe_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               token_ids: torch.Tensor, loss: str, reduce: bool = True) -> torch.Tensor:
    """The probe's loss at each position (DESIGN §4), summed over positions; teacher fixed.

    student_logits: (P, V) with grad; teacher_logits: (P, V); token_ids: (P,).
    reduce=False gives the (P,) per-position losses instead of their sum.
    """
    log_s = F.log_softmax(student_logits.double(), -1)
    log_t = F.log_softmax(teacher_logits.detach().double(), -1)
    if loss == "reverse_kl":
        per = kl(log_s, log_t)
    elif loss == "forward_kl":
        per = kl(log_t, log_s)
    elif loss == "sampled_token":
        y = token_ids.long().view(-1, 1)
        lp_s, lp_t = log_s.gather(-1, y).squeeze(-1), log_t.gather(-1, y).squeeze(-1)
        per = -(lp_t - lp_s).detach() * lp_s
    else:
        raise ValueError(f"unknown loss {loss!r}; one of {LOSSES}")
    return per.sum() if reduce else per
