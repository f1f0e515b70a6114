"""The step rules, in one place: θ1 = θ0 − lr·scale·d(g), and what each rule predicts to first order.

    from teachdiag.probe.steps import RULES, rule
    r = rule("normalized")                       # StepRule: name, default_lr, elementwise, normalized
    d, scale = r.direction(grads, r.norm(grads)) # d may overwrite grads (adam): they are ours
    gain1 = lr * r.first_order(grads, norm)      # lr·⟨g, scale·d⟩, nats: call before direction()
    with torch.no_grad(), stepped(model, named, d, lr, scale):
        z1 = model(ids).logits                   # θ1's logits; the weights are θ0 again after each module

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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


class _Guard(TorchFunctionMode):
    """Refuses any torch function that reads a stepped parameter while it holds θ0 (outside the
    forward of a module that owns it): such a forward would mix θ0 and θ1 without a word."""

    def __init__(self, names: dict[int, str], live: dict[int, int]) -> None:
        super().__init__()
        self.names, self.live = names, live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # .shape, .dtype and the like read no values
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and id(a) in self.names and not self.live.get(id(a)):
                    raise RuntimeError(f"parameter {self.names[id(a)]} is read outside the forward of the "
                                       "module that holds it; the shared step cannot step it module by module")
        return func(*args, **kwargs)


class Stepped:
    """What `stepped` did: peak_bytes, the most parameter bytes it held copied at once."""

    peak_bytes: int = 0


@contextlib.contextmanager
def stepped(model: nn.Module, named: list[tuple[str, torch.Tensor]], directions: list[torch.Tensor], lr: float,
            scale: float) -> Iterator[Stepped]:
    """Forwards of `model` inside see θ1 = θ0 − lr·scale·d while its weights stay θ0 between modules.

    Each module that holds stepped parameters has them stepped in place (by apply_step, so
    the same floats as stepping the whole model) when its forward begins, after a copy of their θ0,
    and copied back when it ends: at no time is there a copy of more than the modules whose forward
    is running (one at a time in a decoder; the tied embedding twice, never together), where stepping
    the whole model in place needs a θ0 copy of all of it (4 bytes a float32 parameter). A parameter
    a module reads while an ancestor already stepped it is not stepped twice. A stepped parameter
    read outside its modules' forwards raises RuntimeError (_Guard). On leaving, however it is left,
    every parameter is θ0 again, bit for bit."""
    step = dict(zip((id(p) for _, p in named), directions))  # id(parameter) -> d
    names = {id(p): n for n, p in named}
    live: dict[int, int] = {}  # id(parameter) -> how many running forwards have it stepped (0 or 1)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its θ0), innermost last
    stats, held = Stepped(), [0]
    counts: dict[int, list[int]] = {}  # id(module) -> parameters each of its running forwards stepped
    hooks = []

    def begin(module, args):
        mine = [p for p in module._parameters.values() if p is not None and id(p) in step and not live.get(id(p))]
        for p in mine:
            live[id(p)] = 1
            saved.append((p, p.detach().clone()))
            held[0] += p.numel() * p.element_size()
            apply_step([p], [step[id(p)]], lr, scale)  # the one definition of θ1
        stats.peak_bytes = max(stats.peak_bytes, held[0])
        counts.setdefault(id(module), []).append(len(mine))

    def end(module, args, output):
        for _ in range(counts[id(module)].pop()):
            _restore_last()
        return output

    def _restore_last():
        p, p0 = saved.pop()
        with torch.no_grad():
            p.copy_(p0)
        held[0] -= p.numel() * p.element_size()
        live[id(p)] = 0  # last: from here on the guard refuses any read of p

    for module in model.modules():
        if any(p is not None and id(p) in step for p in module._parameters.values()):
            hooks.append(module.register_forward_pre_hook(begin))
            hooks.append(module.register_forward_hook(end))
    try:
        with _Guard(names, live):
            yield stats
    finally:
        for h in hooks:
            h.remove()
        while saved:  # a forward that raised midway: its modules' θ0 back
            _restore_last()
