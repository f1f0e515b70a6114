"""Top-K signals: H, D, C from each side's top-K log-probabilities only, as a trainer whose teacher
is served (SGLang, vLLM) sees them, with the released TA-OPD code's conventions.

    from teachdiag.probe.topk import topk_lists, served_signals
    s_ids, s_lp, t_ids, t_lp, t_at_s = topk_lists(log_s, log_t, k=16)    # (P, K) each
    served_signals(s_ids, s_lp, t_ids, t_lp)          # C from the teacher's own list: a lower bound
    served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s)  # C exact: the teacher asked at the student's ids

Conventions (DESIGN "Top-K signals"):
- topk_entropy: the entropy of the student's returned probabilities renormalised over
  themselves, divided by log(max(n, 2)), n the number with p > 0 (n = K but for underflow);
- union_fkl: KL(p̄_T ‖ p̄_S) over U = the union of the two lists, each side renormalised by the
  mass it returned on U; an id the other side did not return has probability 0 there, floored
  at 1e-12 (so a teacher candidate missing from the student's list costs up to p·log(p/1e-12),
  where the full-vocabulary union KL of signals.py reads the student's true probability);
- compat_mass: Σ over the student's ids of the teacher's probability, clamped to [0, 1]; from
  the teacher's own top-K list only it counts the ids both returned (a lower bound), from the
  teacher's log-probabilities at the student's ids it is exact.
A non-finite log-probability is dropped, as the released parser drops it. All float64.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # the floor of a renormalised probability inside the union KL


def topk_lists(log_s: torch.Tensor, log_t: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """From (P, V) log-probabilities: (s_ids, s_logp, t_ids, t_logp, t_logp_at_s_ids), each (P, K),
    the lists a server returns (descending) plus the teacher asked at the student's ids."""
    s_lp, s_ids = log_s.topk(k, dim=-1)
    t_lp, t_ids = log_t.topk(k, dim=-1)
    return s_ids, s_lp, t_ids, t_lp, log_t.gather(-1, s_ids)


def _probs(logp: torch.Tensor) -> torch.Tensor:
    logp = logp.double()
    return torch.where(torch.isfinite(logp), logp.exp(), torch.zeros_like(logp))  # dropped: p = 0


def served_signals(s_ids: torch.Tensor, s_logp: torch.Tensor, t_ids: torch.Tensor, t_logp: torch.Tensor,
                   t_logp_at_s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(P,) float64 topk_entropy, union_fkl, compat_mass from (P, K_s) / (P, K_t) lists (module
    docstring). t_logp_at_s: (P, K_s) the teacher's log-probabilities at s_ids, or None."""
    p_s, p_t = _probs(s_logp), _probs(t_logp)  # (P, K_s), (P, K_t)

    # H: the returned student probabilities renormalised, / log(max(n, 2))
    n = (p_s > 0).sum(-1)
    q = p_s / p_s.sum(-1, keepdim=True).clamp(min=torch.finfo(p_s.dtype).tiny)
    h = -torch.where(p_s > 0, q * q.clamp(min=EPS).log(), torch.zeros_like(q)).sum(-1)
    h = torch.where(p_s.sum(-1) > 0, h / n.clamp(min=2).double().log(), torch.zeros_like(h))

    # D over U: the student's columns first, then the teacher's ids the student did not return
    fs, ft = torch.isfinite(s_logp), torch.isfinite(t_logp)  # what the parser kept
    same = (s_ids[:, :, None] == t_ids[:, None, :]) & fs[:, :, None] & ft[:, None, :]  # (P, K_s, K_t)
    t_on_s = (same * p_t[:, None, :]).sum(-1)  # (P, K_s): 0 where the teacher did not return it
    in_u = torch.cat([fs, ft & ~same.any(1)], -1)  # (P, K_s + K_t): each id of U once
    s_u = torch.cat([p_s, torch.zeros_like(p_t)], -1)
    t_u = torch.cat([t_on_s, p_t], -1)
    s_mass, t_mass = p_s.sum(-1, keepdim=True), p_t.sum(-1, keepdim=True)
    ps = (s_u / s_mass.clamp(min=EPS)).clamp(min=EPS)
    pt = (t_u / t_mass.clamp(min=EPS)).clamp(min=EPS)
    d = torch.where(in_u, pt * (pt.log() - ps.log()), torch.zeros_like(pt)).sum(-1)
    d = torch.where(((s_mass > 0) & (t_mass > 0)).squeeze(-1), d, torch.zeros_like(d))

    # C: the teacher's mass on the student's ids
    c = t_on_s.sum(-1) if t_logp_at_s is None else torch.where(fs, _probs(t_logp_at_s), 0.0).sum(-1)
    return {"topk_entropy": h, "union_fkl": d, "compat_mass": c.clamp(0.0, 1.0)}
