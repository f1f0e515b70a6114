"""The shared step (DESIGN "Three instruments for the gain", the second): one step on the loss of ALL positions, every position re-scored.

    from teachdiag.probe.shared import SharedStep
    step = SharedStep(student, params="all", loss="reverse_kl", optimizer="normalized", lr=1e-2, vocab=V)
    rows = step.run(teacher, ctxs, by_ctx, group)      # {context index: rows}, θ0 restored bit for bit

The per-position probe asks how much a position can teach itself (θ1 = θ0 − lr·d(∇ℓ_j)). The
paper's gain asks how much position t improves when the student is trained on everything: its
Proposition 1, G_t ≈ η·⟨∇L, ∇ℓ_t⟩ with L the mean loss over the batch. Here:

1. θ0: one teacher forward per context of the group, then one student forward + backward per
   context; the gradient of L = mean over the group's positions of ℓ_t accumulates in float32.
   The signals before the step come from the same forward. A position whose loss cannot be
   finite (non-finite teacher logits; sampled_token at a y outside the shared ids) is left out of
   L before its loss is computed: a NaN row's backward would give NaN·0 = NaN in every entry of
   ∇L. Their number is `n_skipped`; their rows are not finite anyway.
2. one step θ1 = θ0 − lr·scale·d(g) with the step rule of probe/steps.py (g = ∇L).
3. θ0 again, forward-mode: ⟨∇ℓ_t, scale·d⟩ = ⟨∂ℓ_t/∂z_t, ż_t⟩ for every position t at once: one
   torch.func.jvp per context gives the logits' derivative ż along d (attention switched to eager:
   sdpa has no forward-mode derivative), and ∂ℓ_t/∂z_t is kept from pass 1's backward. So
   gain_first_order = lr·⟨∇ℓ_t, scale·d⟩. Then θ1: every position re-scored against the teacher
   logits of pass 1, kept (with ∂ℓ/∂z) in a temporary file (positions × vocabulary float32: 10 GB
   each for the 51,600 demo positions, deleted at once; the same floats a second teacher forward
   would give).
4. θ0 copied back from a saved copy (bit for bit).

Cost per context: one teacher forward, student forward + backward, one JVP to the logits (≈ 3.5
eager forwards on CPU), one forward. grad_norm is ‖∇L‖, the same for every row of a group.
"""

from __future__ import annotations

import contextlib
import math
import tempfile

import numpy as np

import torch
from torch import nn
from torch.func import functional_call, jvp

from teachdiag.contexts import Context
from teachdiag.probe.exact import select_params
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import kls_from_logits, probe_loss, signals_from_logits
from teachdiag.probe.steps import apply_step, global_norm, rule


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Attention as plain matmuls while inside: forward-mode AD is not implemented for sdpa kernels."""
    old = model.config._attn_implementation
    if old == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


class TeacherCache:
    """(P, V) float32 tensors per key (a context's teacher logits, its ∂ℓ/∂z) in one temporary file,
    deleted when closed."""

    def __init__(self, folder: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".teacher-logits-")
        self.where: dict = {}

    def put(self, c, t: torch.Tensor) -> None:
        a = t.detach().to("cpu", torch.float32).numpy()
        self.file.seek(0, 2)
        self.where[c] = (self.file.tell(), a.shape)
        a.tofile(self.file)

    def get(self, c, device) -> torch.Tensor:
        offset, shape = self.where[c]
        self.file.seek(offset)
        a = np.fromfile(self.file, dtype=np.float32, count=shape[0] * shape[1]).reshape(shape)
        return torch.from_numpy(a).to(device)

    def close(self) -> None:
        self.file.close()


class SharedStep:
    """Holds θ0 of the stepped parameters; `run` takes one shared step for a group of contexts."""

    def __init__(self, model: nn.Module, params: str, loss: str, optimizer: str, lr: float, vocab: int,
                 top_k: int = 16, first_order: bool = True, cache_dir: str | None = None,
                 keep: torch.Tensor | None = None, signals: str = "full") -> None:
        """keep: None, or bool (vocab,): the ids both tokenizers agree on (signals.py); signals:
        where H, D, C come from (signals.SIGNAL_MODES)."""
        self.model, self.loss, self.lr, self.vocab, self.top_k = model, loss, float(lr), vocab, top_k
        self.keep, self.signals = keep, signals
        self.rule = rule(optimizer)
        self.named = select_params(model, params)
        self.params = [p for _, p in self.named]
        for name, p in self.named:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"stepped parameter {name} is {p.dtype}; keep the student in float32")
        self.theta0 = [p.detach().clone() for p in self.params]
        self.first_order = first_order
        self.cache_dir = cache_dir  # where pass 1's teacher logits wait for pass 2 (None: the temp folder)
        self.grad_norm = math.nan  # ‖∇L‖ of the last group
        self.n_skipped = 0  # positions of the last group left out of L (their loss is not finite)

    def _logits(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(P, V) float32 student logits at sequence indices `keep` of ids (T,)."""
        return self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False).logits[0, :, : self.vocab].float()

    @staticmethod
    def _view(ctx: Context, positions: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student ids up to the last position's prefix (T,), the indices predicting each position (P,),
        the sampled tokens (P,)."""
        n = len(ctx.prompt_ids)
        ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[: max(positions)], device=device)
        keep = torch.tensor([n + j - 1 for j in positions], device=device)
        y = torch.tensor([ctx.response_ids[j] for j in positions], device=device)
        return ids, keep, y

    def _usable(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(P,) bool: positions whose loss can enter L (finite teacher row; for sampled_token a y
        among the kept ids)."""
        use = torch.isfinite(t).all(1)
        if self.loss == "sampled_token" and self.keep is not None:
            use &= self.keep[y]
        return use

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int],
            device, progress=None) -> dict[int, list[dict]]:
        """Rows of every position of the group's contexts, after ONE step on their mean loss.

        progress: an optional callable(n_positions, phase) for a progress bar."""
        before: dict[int, tuple[dict, list[bool]]] = {}
        for p in self.params:
            p.grad = None
        cache = TeacherCache(self.cache_dir)
        try:
            # 1. θ0: the teacher first, so the mean is over the positions that can enter L ...
            n_total = n_used = 0
            for c in group:
                ctx, positions = ctxs[c], by_ctx[c]
                t = teacher_logits(teacher, ctx, positions, self.vocab, device)  # (P, V)
                cache.put(c, t)
                n_total += len(positions)
                n_used += int(self._usable(t, self._view(ctx, positions, device)[2]).sum())
            self.n_skipped = n_total - n_used
            # ... then the gradient of the mean loss, and the signals before the step
            for p in self.params:
                p.requires_grad_(True)
            for c in group:
                ctx, positions = ctxs[c], by_ctx[c]
                t = cache.get(c, device)
                ids, keep, y = self._view(ctx, positions, device)
                use = self._usable(t, y)
                rows = slice(None) if use.all() else use  # rows chosen BEFORE the loss exists
                with torch.enable_grad():
                    z = self._logits(ids, keep)  # (P, V)
                    if self.first_order:
                        z.retain_grad()
                    if use.any():  # grads accumulate over contexts
                        (probe_loss(z[rows], t[rows], y[rows], self.loss, keep=self.keep) / n_used).backward()
                if self.first_order:  # ∂ℓ_t/∂z_t (rows are independent in L, each weighted 1/n_used)
                    delta = z.grad * n_used if z.grad is not None else torch.zeros_like(z)
                    cache.put(("delta", c), delta.masked_fill(~use[:, None], float("nan")))
                z = z.detach()
                sig = {k: v.tolist() for k, v in signals_from_logits(z, t, y, self.top_k, self.keep, self.signals).items()}
                ok = (torch.isfinite(z).all(1) & torch.isfinite(t).all(1)).tolist()
                before[c] = (sig, ok)
                if progress:
                    progress(len(positions), "gradient")
            for p in self.params:
                p.requires_grad_(False)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p in self.params:
                p.grad = None
            self.grad_norm = global_norm(grads)
            directions, scale = self.rule.direction(grads, self.grad_norm)
            tangents = ({n: d * scale for (n, _), d in zip(self.named, directions)}  # once per group
                        if self.first_order else None)

            rows: dict[int, list[dict]] = {}
            for c in group:
                ctx, positions = ctxs[c], by_ctx[c]
                t = cache.get(c, device)
                ids, keep, y = self._view(ctx, positions, device)
                # 3. first order at θ0: ⟨∇ℓ_t, scale·d⟩ = ⟨∂ℓ_t/∂z_t, ż_t⟩, ż from one forward-mode pass
                g_dot_d = (self._directional(ids, keep, cache.get(("delta", c), device), tangents)
                           if self.first_order else [math.nan] * len(positions))
                # 2. θ1, re-score, back to θ0
                try:
                    apply_step(self.params, directions, self.lr, scale)
                    with torch.no_grad():
                        z1 = self._logits(ids, keep)
                finally:
                    self.restore()
                after = kls_from_logits(z1, t, self.keep)
                sig, ok = before[c]
                ok1 = torch.isfinite(z1).all(1).tolist()
                fkl1, rkl1 = after["fkl"].tolist(), after["rkl"].tolist()
                rows[c] = [make_row({k: v[i] for k, v in sig.items()}, fkl1[i], rkl1[i], self.grad_norm,
                                    self.lr * g_dot_d[i], ok[i] and ok1[i]) for i in range(len(positions))]
                if progress:
                    progress(len(positions), "re-score")
            return rows
        finally:
            cache.close()
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
            self.restore()

    def _directional(self, ids, keep, delta: torch.Tensor, tangents: dict) -> list[float]:
        """⟨∇ℓ_t(θ0), scale·d⟩ for each position of one context, float64 list (nats per unit lr).

        By the chain rule it is ⟨∂ℓ_t/∂z_t, ż_t⟩ with ż = J_z·(scale·d), the logits' directional
        derivative: one forward-mode pass to the logits (not through the float64 loss), and δ =
        ∂ℓ_t/∂z_t (P, V) kept from the gradient pass (NaN on rows left out of L)."""
        primals = {n: p.detach() for n, p in self.named}

        def logits(stepped: dict) -> torch.Tensor:
            z = functional_call(self.model, stepped, (), {"input_ids": ids[None], "logits_to_keep": keep,
                                                          "use_cache": False}, strict=False)
            return z.logits[0, :, : self.vocab].float()

        with eager_attention(self.model), torch.no_grad():
            _, dz = jvp(logits, (primals,), (tangents,))  # (P, V)
        return (delta.double() * dz.double()).sum(-1).tolist()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy θ0 back into the stepped parameters (exact, bit for bit)."""
        for p, p0 in zip(self.params, self.theta0):
            p.copy_(p0)
