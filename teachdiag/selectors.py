"""Which positions a selective OPD trainer keeps: the TA-OPD mask and its baselines, on logits.

    import teachdiag
    keep = teachdiag.ta_opd_mask(student_logits, teacher_logits, response_mask, budget=0.05)   # (B, T) bool
    loss = (per_token_loss * keep).sum() / keep.sum()          # normalised by the kept positions
    sig = teachdiag.selectors.response_signals(student_logits, teacher_logits, response_mask)  # (N,) arrays

For a verl / TRL-style batch: student_logits and teacher_logits are (B, T, V) at the response
positions (teacher logits on the student's own tokens, same vocabulary), response_mask (B, T) is 1
on response tokens; loss_mask (B, T), if the batch has one, says which of them may be trained on.

By default this selects what the released TA-OPD code (a fork of slime, rollout/tip_compat.py)
selects, rule for rule (DESIGN "The trainer and the selectors"): H, D, C from each side's top-K
lists (signals "topk", C exact), normalised over every response row of the batch (loss-masked
ones included), flat below 1e-12; max(1, ceil(ρ·N_valid)) rows of the whole batch, best score
first, ties to the earlier position within its response; then every sample left without a row
gets its best one by the soft OR H̃ ∨ norm(D·C), beyond the budget. Selectors, scores and the
rule itself live in scores.py (selector_scores, keep_positions), torch-free; rule="paper_text"
is teachdiag ≤ 0.2's reading of the paper's text, kept to reproduce runs made with it.
"""

from __future__ import annotations

import numpy as np
import torch

from teachdiag.probe.signals import signals_from_logits
from teachdiag.scores import KEEP_RULES, SELECTORS, keep_positions

__all__ = ["SELECTORS", "KEEP_RULES", "keep_positions", "response_signals", "ta_opd_mask"]


def ta_opd_mask(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor,
                budget: float = 0.05, selector: str = "teachability", k: int = 16, seed: int = 0,
                chunk: int = 512, loss_mask: torch.Tensor | None = None, rule: str = "released",
                signals: str = "topk", normalize_over: str = "response") -> torch.Tensor:
    """(B, T) bool mask of the positions to train on; see the module docstring.

    student_logits, teacher_logits: (B, T, V) (any float dtype; scored in float64, `chunk`
    positions at a time); response_mask: (B, T), nonzero on response tokens (left or right
    padding); loss_mask: (B, T) or None (= response_mask), nonzero where the loss may train;
    signals: "topk" (released), "topk_lb" (C from the teacher's list only, as the released code
    without exact C) or "full" (teachdiag's full-distribution H, D, C). teachdiag ≤ 0.2's mask
    exactly: rule="paper_text", signals="full"."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; one of {SELECTORS}")
    sig = response_signals(student_logits, teacher_logits, response_mask, k, chunk, signals)
    where = response_mask.bool().nonzero(as_tuple=False)  # (N, 2) row-major, the rows of sig
    valid = None if loss_mask is None else loss_mask.bool()[where[:, 0], where[:, 1]].cpu().numpy()
    keep = keep_positions(sig, selector, budget, valid, rule, seed, normalize_over)
    mask = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    mask[where[:, 0], where[:, 1]] = torch.from_numpy(keep).to(mask.device)
    return mask


def response_signals(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor,
                     k: int = 16, chunk: int = 512, signals: str = "topk") -> dict[str, np.ndarray]:
    """The (N,) signal arrays keep_positions reads, one row per response token of (B, T) response_mask
    in row-major order: topk_entropy, union_fkl, compat_mass, fkl (float64), sample (the row b),
    position (index among b's response tokens) and response_length. What ta_opd_mask selects from;
    a trainer that scores its batch in pieces concatenates these (sample offset by the rows before)."""
    on = response_mask.bool()  # (B, T)
    where = on.nonzero(as_tuple=False)  # (N, 2) row-major
    s = student_logits.detach()[where[:, 0], where[:, 1]]  # (N, V)
    t = teacher_logits.detach()[where[:, 0], where[:, 1]]
    y = s.argmax(-1)  # the signals used here do not depend on the sampled token
    parts = [signals_from_logits(s[a : a + chunk], t[a : a + chunk], y[a : a + chunk], k, mode=signals)
             for a in range(0, len(s), chunk)]
    sig = {name: torch.cat([p[name] for p in parts]).cpu().numpy() if parts else np.zeros(0)
           for name in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
    sig["sample"] = where[:, 0].cpu().numpy()
    # the index among the row's response tokens and their number (left padding is fine)
    sig["position"] = (on.long().cumsum(1) - 1)[where[:, 0], where[:, 1]].cpu().numpy()
    sig["response_length"] = on.sum(1)[where[:, 0]].cpu().numpy()
    return sig
