"""The step rules, in one place: θ1 = θ0 − lr·scale·d(g), and what each rule predicts to first order.

    from teachdiag.probe.steps import RULES, rule
    r = rule("normalized")                       # StepRule: name, default_lr, elementwise, normalized
    d, scale = r.direction(grads, r.norm(grads)) # d may overwrite grads (adam): they are ours
    gain1 = lr * r.first_order(grads, norm)      # lr·⟨g, scale·d⟩, nats: call before direction()

A rule is an elementwise map g ↦ d(g) and an optional global scale 1/‖g‖:

    sgd          d = g                 scale 1        first order lr·‖g‖²
    normalized   d = g                 scale 1/‖g‖    first order lr·‖g‖
    adam         d = g/(|g|+1e-8)      scale 1        first order lr·Σ g²/(|g|+1e-8) ≈ lr·‖g‖₁

(adam's row is the first bias-corrected Adam step, no weight decay: m̂ = g, v̂ = g².) Every
instrument calls these functions: the per-position probes (exact, batched, closed-form head,
top blocks), linear mode, calibrate, the shared step and the trainer's probe. A new rule is one
entry in RULES. `inner(g)` = Σ g·d(g) is the one quantity a rule needs beyond ‖g‖; for the rules
with d = g it is ‖g‖² and never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ADAM_EPS = 1e-8


def _adam_first_step(g: torch.Tensor) -> torch.Tensor:
    """g/(|g|+eps), in place: the first bias-corrected Adam step's direction."""
    return g.div_(g.abs().add_(ADAM_EPS))


@dataclass(frozen=True)
class StepRule:
    name: str
    default_lr: float  # chosen on the demo pair; README "Choosing the step"
    elementwise: Callable[[torch.Tensor], torch.Tensor] | None  # d(g) in place; None: d = g
    normalized: bool  # scale = 1/‖g‖ (0 where g = 0)
    formula: str  # one line for --help and run.json

    def scale(self, grad_norm: float) -> float:
        if not self.normalized:
            return 1.0
        return 1.0 / grad_norm if grad_norm > 0 else 0.0

    def direction(self, grads: list[torch.Tensor], grad_norm: float) -> tuple[list[torch.Tensor], float]:
        """(d, scale) with θ1 = θ0 − lr·scale·d. Overwrites `grads` for elementwise rules."""
        if self.elementwise is not None:
            with torch.no_grad():
                grads = [self.elementwise(g) for g in grads]
        return grads, self.scale(grad_norm)

    def inner(self, g: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """Σ g·d(g) in float64, over all but the first `batch_dims` dims (g is not modified)."""
        d = g * g if self.elementwise is None else g * self.elementwise(g.clone())
        return d.flatten(batch_dims).sum(-1, dtype=torch.float64) if batch_dims else d.sum(dtype=torch.float64)

    def first_order_from(self, grad_norm: torch.Tensor | float, inner: torch.Tensor | float | None = None):
        """⟨g, scale·d⟩ per unit lr (nats), from ‖g‖ and, for elementwise rules, Σ g·d(g).
        Works on floats or on (B,) tensors of per-position norms."""
        if self.elementwise is not None:
            if inner is None:
                raise ValueError(f"step rule {self.name} needs Σ g·d(g), not only ‖g‖")
            return inner
        return grad_norm if self.normalized else grad_norm**2  # ‖g‖²/‖g‖ or ‖g‖²

    def first_order(self, grads: list[torch.Tensor], grad_norm: float) -> float:
        """⟨g, scale·d⟩ per unit lr for a list of gradient tensors; call before direction()."""
        inner = None
        if self.elementwise is not None:
            inner = float(torch.stack([self.inner(g) for g in grads]).sum())
        return float(self.first_order_from(grad_norm, inner))


RULES: dict[str, StepRule] = {
    "sgd": StepRule("sgd", 1e-5, None, False, "θ1 = θ0 − lr·g"),
    "normalized": StepRule("normalized", 1e-3, None, True, "θ1 = θ0 − lr·g/‖g‖"),
    "adam": StepRule("adam", 1e-7, _adam_first_step, False, "θ1 = θ0 − lr·g/(|g|+1e-8) (first Adam step)"),
}
OPTIMIZERS = tuple(RULES)


def rule(name: str) -> StepRule:
    """The step rule called `name`; ValueError for an unknown one (configs check names first)."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown step rule {name!r}; one of {OPTIMIZERS}") from None


def global_norm(grads: list[torch.Tensor]) -> float:
    """‖g‖ over all tensors: norms of rows in the tensors' dtype, combined in float64.

    Why rows: a float32 norm over one 28M-entry matrix is off by ~1e-3 relative on CPU (the
    sum of squares accumulates rounding); rows of a few thousand entries stay at ~1e-7."""
    rows = [torch.linalg.vector_norm(g.reshape(-1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, -1), dim=1)
            for g in grads]
    return float(torch.linalg.vector_norm(torch.cat(rows).double()))  # one device sync, not one per tensor


def apply_step(params: list[torch.Tensor], directions: list[torch.Tensor], lr: float, scale: float) -> None:
    """θ ← θ − lr·scale·d in place (the caller restores θ0 from a saved copy, never by subtraction)."""
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(d, alpha=-lr * scale)
