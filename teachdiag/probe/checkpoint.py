"""Checkpoint gain (DESIGN "Three instruments for the gain", the third): two students scored on the same frozen contexts, no step.

    teachdiag probe --student theta0/ --student-after theta_tau/ --teacher T --contexts c.jsonl --out runs/ckpt

    from teachdiag.probe.checkpoint import CheckpointScore
    score = CheckpointScore(student, after, vocab=V)
    rows = score.run_context(student_ids, n_prompt, teacher_logits, positions)

This is what the paper ran: θτ is a checkpoint after τ steps of real OPD training (from
`teachdiag train`, or verl / TRL / OpenRLHF output), and the gain of position t is the drop of
its KL from θ0 to θτ on the same context. Every signal comes from θ0; fkl_after/rkl_after from
θτ. No gradient is taken, so grad_norm and gain_first_order are NaN. The paper's relative gain
(KLf(θ0) − KLf(θτ)) / (KLf(θ0) + 1e-12) is what `analyze --protocol paper` computes from fkl and
fkl_after; rel_gain_fkl here is gain / before like every instrument's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import kls_from_logits, signals_from_logits


class CheckpointScore:
    """θ0 (`model`) and θτ (`after`): one forward of each per context, all positions at once."""

    def __init__(self, model: nn.Module, after: nn.Module, vocab: int, top_k: int = 16,
                 keep: torch.Tensor | None = None, signals: str = "full") -> None:
        """keep: None, or bool (vocab,): the ids both tokenizers agree on (signals.py); signals:
        where H, D, C come from (signals.SIGNAL_MODES)."""
        self.model, self.after, self.vocab, self.top_k, self.keep = model, after, vocab, top_k, keep
        self.signals = signals

    def _logits(self, model: nn.Module, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids[None], logits_to_keep=keep, use_cache=False)
        return out.logits[0, :, : self.vocab].float()  # (P, V)

    def run_context(self, student_ids: torch.Tensor, n_prompt: int, teacher_logits: torch.Tensor,
                    positions: list[int]) -> list[dict[str, float]]:
        """Rows for `positions` of one context.

        student_ids: (n_prompt + R,) prompt + response; teacher_logits: (P, V) float32, row i the
        teacher's distribution for response[positions[i]]."""
        ids = student_ids[: n_prompt + max(positions)]
        keep = torch.tensor([n_prompt + j - 1 for j in positions], device=ids.device)
        y = student_ids[[n_prompt + j for j in positions]]
        t = teacher_logits
        z0, z1 = self._logits(self.model, ids, keep), self._logits(self.after, ids, keep)
        before = {k: v.tolist() for k, v in signals_from_logits(z0, t, y, self.top_k, self.keep, self.signals).items()}
        after = kls_from_logits(z1, t, self.keep)
        fkl1, rkl1 = after["fkl"].tolist(), after["rkl"].tolist()
        ok = (torch.isfinite(z0).all(1) & torch.isfinite(z1).all(1) & torch.isfinite(t).all(1)).tolist()
        # no gradient: grad_norm is NaN, and make_row must not read that as a non-finite row
        return [dict(make_row({k: v[i] for k, v in before.items()}, fkl1[i], rkl1[i], 0.0, math.nan, ok[i]),
                     grad_norm=math.nan) for i in range(len(positions))]
