"""The exact single-step probe (DESIGN "One step rule"): one step toward the teacher per position, then restore.

    from teachdiag.probe.exact import SingleStepProbe
    probe = SingleStepProbe(student, params="all", loss="reverse_kl", optimizer="normalized",
                            lr=1e-3, vocab=V)
    rows = probe.run_context(student_ids, n_prompt, teacher_logits, positions)
    # the student is back at θ0, bit for bit, after every position
    pg = probe.position_gradient(prefix, teacher_logits_j, y_j)  # one backward at θ0 ...
    row = probe.row(pg, probe.stepped_logits(pg, lr), lr)  # ... reused for any lr (calibration.py)

For each position j, starting from θ0: forward the prefix prompt + response[:j] (causal, so
nothing after j matters), take the loss against the fixed teacher distribution, one update
θ1 = θ0 − lr·d, forward the same prefix again. The step is taken module by module inside that
forward (steps.stepped): each module's θ0 is copied back from a copy of that module alone when
its forward ends (a subtraction would not restore the bits), so no copy of the whole model's θ0
is held: 8 bytes per stepped float32 parameter (weights, gradient turned into d) plus the largest
module. The "before" numbers come from the same prefix forward as the "after" ones, so gain =
before − after compares like with like.

Precision: the stepped parameters must be float32 or float64. A step of lr·d on bfloat16
weights rounds to no change for most entries (8-bit mantissa), so the probe refuses them;
the probe command keeps the student in float32 whatever --dtype says about the teacher.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from teachdiag.errors import InputError, UnsupportedModel
from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import kls_from_logits, probe_loss, signals_from_logits
from teachdiag.probe.steps import global_norm, rule, stepped



def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with config.num_hidden_layers entries (layers / h /
    blocks); the longest list only when the config does not say (MoE expert lists can be longer)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == n]
    if exact:
        return exact[0]  # modules() is outer first: the decoder's own list
    if not lists:
        raise UnsupportedModel("cannot find the transformer blocks of this model", field="--params")
    return max(lists, key=len)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (model.model.norm in Llama/Qwen)."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    return None


def parse_params(params: str) -> int | None:
    """Check --params' syntax: 'all' and 'lm_head' give None, 'last:N' gives N (>= 1)."""
    if params in ("all", "lm_head"):
        return None
    if params.startswith("last:"):
        try:
            n = int(params.split(":", 1)[1])
        except ValueError:
            raise InputError(f"last:N needs an integer N, got {params!r}", field="--params") from None
        if n >= 1:
            return n
    raise InputError(f"unknown value {params!r} (all, lm_head, last:N with N >= 1)", field="--params")


def select_params(model: nn.Module, params: str) -> list[tuple[str, nn.Parameter]]:
    """The parameter set the step touches: 'all', 'lm_head' or 'last:N'.

    With tied embeddings the LM head *is* the input embedding: stepping it moves both uses,
    as training would, and its gradient sums both paths (autograd does this for a shared
    Parameter). Parameters are listed once even when shared.
    """
    named = dict(model.named_parameters())  # named_parameters() already drops shared duplicates
    by_id = {id(p): n for n, p in named.items()}
    head = model.get_output_embeddings().weight
    if params == "all":
        chosen = list(named.values())
    elif params == "lm_head":
        chosen = [head]
    elif params.startswith("last:"):
        n = parse_params(params)
        blocks = decoder_blocks(model)
        if not 1 <= n <= len(blocks):
            raise InputError(f"last:N needs 1 <= N <= {len(blocks)} blocks, got {n}", field="--params")
        chosen = [p for b in blocks[-n:] for p in b.parameters()]
        norm = final_norm(model)
        chosen += list(norm.parameters()) if norm is not None else []
        chosen.append(head)
    else:
        parse_params(params)  # raises for anything else
    seen, out = set(), []
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((by_id[id(p)], p))
    return out


@dataclass
class PositionGrad:
    """One position at θ0: what any step size needs (the direction is lr-free)."""

    prefix: torch.Tensor  # (L,) student input ids
    teacher: torch.Tensor  # (1, V) teacher logits, float32
    token: torch.Tensor  # (1,) sampled token y_j
    before: dict[str, float]  # signals at θ0
    directions: list[torch.Tensor]  # d, one tensor per stepped parameter
    scale: float  # θ1 = θ0 − lr·scale·d
    grad_norm: float  # ‖g‖
    g_dot_d: float  # ⟨g, scale·d⟩: gain_first_order = lr·g_dot_d (nats per unit lr)
    finite: bool


class SingleStepProbe:
    """Probes positions one at a time, each from θ0 (the weights are θ0 between calls)."""

    def __init__(self, model: nn.Module, params: str, loss: str, optimizer: str, lr: float,
                 vocab: int, top_k: int = 16, keep: torch.Tensor | None = None, signals: str = "full") -> None:
        """keep: None, or bool (vocab,) on the model's device: the ids both tokenizers agree on
        (signals.py); every signal and the loss then live on those ids, renormalised. signals:
        where H, D, C come from (signals.SIGNAL_MODES)."""
        self.model, self.loss, self.optimizer, self.lr = model, loss, optimizer, float(lr)
        self.rule = rule(optimizer)
        self.vocab, self.top_k, self.keep, self.signals = vocab, top_k, keep, signals
        self.named = select_params(model, params)
        self.params = [p for _, p in self.named]
        for name, p in self.named:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"stepped parameter {name} is {p.dtype}; a small step would round "
                                 "to nothing, keep the student in float32")
        self.n_stepped = sum(p.numel() for p in self.params)

    def _last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, V) logits predicting the token after `ids` (L,), padded vocab rows dropped."""
        out = self.model(input_ids=ids[None], logits_to_keep=1, use_cache=False)
        return out.logits[0, -1:, : self.vocab].float()

    def probe_position(self, prefix: torch.Tensor, teacher_logits: torch.Tensor,
                       token_id: int) -> dict[str, float]:
        """Signals before, the step, and the same signals after, for one position.

        prefix: (L,) student input ids = prompt + response[:j]; teacher_logits: (V,) float32.
        """
        pg = self.position_gradient(prefix, teacher_logits, token_id)
        return self.row(pg, self.stepped_logits(pg, self.lr), self.lr)

    def position_gradient(self, prefix: torch.Tensor, teacher_logits: torch.Tensor,
                          token_id: int) -> PositionGrad:
        """Forward + backward at θ0 once; the result serves any number of step sizes.

        prefix: (L,) student input ids; teacher_logits: (V,) float32.
        """
        t = teacher_logits[None]  # (1, V)
        y = torch.tensor([token_id], device=prefix.device)
        with self.differentiable():
            s_before = self._last_logits(prefix)  # (1, V)
            grads = torch.autograd.grad(probe_loss(s_before, t, y, self.loss, keep=self.keep), self.params)
        return self.gradient_at(prefix, s_before.detach(), t, y, list(grads))

    @contextlib.contextmanager
    def differentiable(self):
        """Autograd on, for the stepped parameters only, and off again whatever happens."""
        for p in self.params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                yield
        finally:
            for p in self.params:
                p.requires_grad_(False)

    def gradient_at(self, prefix: torch.Tensor, s_before: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    grads: list[torch.Tensor]) -> PositionGrad:
        """PositionGrad from a position's logits at θ0 (1, V) and its gradient (one tensor per
        parameter, ours to overwrite: adam's direction is computed in place)."""
        before = {k: v.item() for k, v in signals_from_logits(s_before, t, y, self.top_k, self.keep, self.signals).items()}
        grad_norm = global_norm(grads)
        g_dot_d = self.rule.first_order(grads, grad_norm)  # before adam's direction overwrites g
        finite = bool(torch.isfinite(s_before).all() and torch.isfinite(t).all())
        directions, scale = self.rule.direction(grads, grad_norm)
        return PositionGrad(prefix, t, y, before, directions, scale, grad_norm, g_dot_d, finite)

    def stepped_logits(self, pg: PositionGrad, lr: float) -> torch.Tensor:
        """(1, V) logits of pg's prefix at θ1 = θ0 − lr·scale·d; θ0 is back afterwards, bit for bit
        (also on OOM or Ctrl-C: steps.stepped restores each module however its forward ends)."""
        with torch.no_grad(), stepped(self.model, self.named, pg.directions, lr, pg.scale):
            return self._last_logits(pg.prefix)

    def row(self, pg: PositionGrad, s_after: torch.Tensor, lr: float) -> dict[str, float]:
        """The tokens.csv row of one position: signals before, KLs after the step of size lr, gains."""
        after = kls_from_logits(s_after, pg.teacher, self.keep)
        finite = pg.finite and bool(torch.isfinite(s_after).all())
        return make_row(pg.before, after["fkl"].item(), after["rkl"].item(), pg.grad_norm, lr * pg.g_dot_d, finite)

    def run_context(self, student_ids: torch.Tensor, n_prompt: int, teacher_logits: torch.Tensor,
                    positions: list[int]) -> list[dict[str, float]]:
        """Probe `positions` of one context.

        student_ids: (n_prompt + R,) prompt + response; teacher_logits: (P, V) float32, row i
        the teacher's distribution for response[positions[i]] (from the teacher's view).
        """
        rows = []
        for i, j in enumerate(positions):
            prefix = student_ids[: n_prompt + j]
            rows.append(self.probe_position(prefix, teacher_logits[i], int(student_ids[n_prompt + j])))
        return rows
