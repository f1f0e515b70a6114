"""Which positions a selective OPD trainer keeps (DESIGN §5): the TA-OPD mask and its baselines.

    import teachdiag
    keep = teachdiag.ta_opd_mask(student_logits, teacher_logits, response_mask, budget=0.05)   # (B, T) bool
    loss = (per_token_loss * keep).sum() / keep.sum()          # normalised by the kept positions

For a verl / TRL-style batch: student_logits and teacher_logits are (B, T, V) at the response
positions (teacher logits on the student's own tokens, same vocabulary), response_mask (B, T) is 1
on real response tokens. The scores are what a trainer has, per rollout batch (DESIGN §5's
training definitions): H = top-K entropy / log K, D = KL over topK(p_S) ∪ topK(p_T), C = teacher
mass on the student's top-K, each quantile-normalised over the batch's positions (table.py):

    teachability   D̃·C̃                entropy   H̃          tip   H̃ + D̃ − H̃·D̃
    teach_entropy  H̃ + T̃ − H̃·T̃ (T = D̃·C̃)   fkl   full-vocabulary KL(p_T ‖ p_S)   random   seeded
    position       PW-OPSD's position weight w_t (table.position_weight): the latest positions of
                   each response first, by their share (t + 0.5)/L of it
    all            every position

Budget rule: round(budget·N) positions of the whole batch, at least one per sample: each sample's
best position first, then the best of the rest (ties go to the earlier position, row-major), so
the mask keeps exactly max(round(budget·N), samples with a response) positions.
"""

from __future__ import annotations

import numpy as np
import torch

from teachdiag.probe.signals import signals_from_logits
from teachdiag.table import budget_count, peer_scores, position_weight, teachability_scores

SELECTORS = ("all", "teachability", "entropy", "tip", "teach_entropy", "fkl", "random", "position")


def selector_scores(signals: dict[str, np.ndarray], selector: str, seed: int = 0) -> np.ndarray:
    """(N,) float64 score of each position from its signals (topk_entropy, union_fkl, compat_mass,
    fkl), normalised over these N positions. Higher is kept first. `position` reads
    signals["position"] (0-based, within its response) and signals["response_length"] instead;
    it uses the default schedule, whose order is that of (t + 0.5)/L for any w_min < 1."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; one of {SELECTORS}")
    n = len(signals["fkl"])
    if selector == "all":
        return np.ones(n)
    if selector == "random":
        return np.random.default_rng(seed).random(n)
    if selector == "fkl":
        return np.asarray(signals["fkl"], dtype=np.float64)
    if selector == "position":
        return position_weight(signals["position"], signals["response_length"])
    teach = teachability_scores(signals["union_fkl"], signals["compat_mass"])[0]  # D̃·C̃ over these N
    if selector == "teachability":
        return teach
    return peer_scores(signals["topk_entropy"], signals["union_fkl"], teach)[selector]


def budget_mask(scores: np.ndarray, sample: np.ndarray, budget: float) -> np.ndarray:
    """(N,) bool: round(budget·N) top scores over all positions, at least one per sample.

    scores: (N,) in row-major position order; sample: (N,) which sample each position belongs to.
    NaN scores are never preferred over finite ones. Ties go to the earlier position."""
    n = len(scores)
    wanted = budget_count(n, budget)  # raises for a budget outside (0, 1]
    key = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.lexsort((np.arange(n), -key))  # best first; equal scores: earlier index first
    keep = np.zeros(n, dtype=bool)
    seen: set = set()
    for i in order:  # each sample's best position
        if sample[i] not in seen:
            seen.add(sample[i])
            keep[i] = True
    room = max(wanted, len(seen)) - len(seen)
    rest = [i for i in order if not keep[i]][:room]
    keep[rest] = True
    return keep


def ta_opd_mask(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor,
                budget: float = 0.05, selector: str = "teachability", k: int = 16, seed: int = 0,
                chunk: int = 512) -> torch.Tensor:
    """(B, T) bool mask of the positions to train on; see the module docstring.

    student_logits, teacher_logits: (B, T, V) (any float dtype; scored in float64, `chunk`
    positions at a time); response_mask: (B, T), nonzero on response tokens."""
    on = response_mask.bool()  # (B, T)
    where = on.nonzero(as_tuple=False)  # (N, 2) row-major
    s = student_logits.detach()[where[:, 0], where[:, 1]]  # (N, V)
    t = teacher_logits.detach()[where[:, 0], where[:, 1]]
    y = s.argmax(-1)  # the signals used here do not depend on the sampled token
    parts = [signals_from_logits(s[a : a + chunk], t[a : a + chunk], y[a : a + chunk], k)
             for a in range(0, len(s), chunk)]
    sig = {name: torch.cat([p[name] for p in parts]).cpu().numpy() for name in ("topk_entropy", "union_fkl",
                                                                             "compat_mass", "fkl")}
    # for `position`: the index among the row's response tokens and their number (left padding is fine)
    sig["position"] = (on.long().cumsum(1) - 1)[where[:, 0], where[:, 1]].cpu().numpy()
    sig["response_length"] = on.sum(1)[where[:, 0]].cpu().numpy()
    keep = budget_mask(selector_scores(sig, selector, seed), where[:, 0].cpu().numpy(), budget)
    mask = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    mask[where[:, 0], where[:, 1]] = torch.from_numpy(keep).to(mask.device)
    return mask
