"""The shared step (DESIGN "Three instruments for the gain", the second): one step on the loss of ALL positions, every position re-scored.

    from teachdiag.probe.shared import SharedStep
    step = SharedStep(student, params="all", loss="reverse_kl", optimizer="normalized", lr=1e-2, vocab=V)
    rows = step.run(teacher, ctxs, by_ctx, group, device)   # {context index: rows}, θ0 restored bit for bit
    # or in parts, as the instrument drives it (rows per group of contexts, the step saved for --resume):
    step.gradient(teacher, ctxs, by_ctx, group, device)     # pass 1 over the step's contexts
    step.save(path, group, by_ctx)                          # ∇L and the θ0 signals (probe/stepfile.py)
    rows = step.rescore(teacher, ctxs, by_ctx, some, device)  # pass 2, any part of the group, any order
    step.release()

The per-position probe asks how much a position can teach itself (θ1 = θ0 − lr·d(∇ℓ_j)). The
paper's gain asks how much position t improves when the student is trained on everything: its
Proposition 1, G_t ≈ η·⟨∇L, ∇ℓ_t⟩ with L the mean loss over the batch. Here:

1. θ0, per context: a teacher forward, a student forward whose decoder layers keep only their
   inputs (probe/recompute.py), ∂ℓ/∂z from the float64 loss a chunk of positions at a time
   (signals.loss_grad), one backward that runs each layer again; ∇L of L = mean of ℓ_t over the group's
   usable positions accumulates in float32, and the signals before the step come from the same
   forward. A position whose loss cannot be finite (non-finite teacher logits; sampled_token at a
   y outside the shared ids) is left out before its loss is computed: a NaN row's backward would
   give NaN·0 = NaN in every entry of ∇L. Their number is `n_skipped`; their rows are not finite.
   The loss is divided by the group's number of positions as it goes and ∇L rescaled once at the
   end when some were left out, so with none left out ∇L is bit for bit ∇(Σℓ/n).
2. one step θ1 = θ0 − lr·scale·d(g) with the step rule of probe/steps.py (g = ∇L), taken module by
   module inside each re-scoring forward (steps.stepped): a module's parameters are stepped in place
   when its forward begins and copied back from a copy of that module alone when it ends, so the
   weights are θ0 between forwards and no copy of the whole model's θ0 is ever made.
3. again per context: the teacher's logits from a second forward (the same floats; nothing of
   positions × vocabulary size is kept between the passes), then at θ0, forward-mode, ⟨∇ℓ_t,
   scale·d⟩ = scale·⟨∂ℓ_t/∂z_t, ż_t⟩ for every position at once: one torch.func.jvp gives the θ0
   logits z and their derivative ż along d (attention switched to eager: sdpa has no forward-mode
   derivative), and ∂ℓ_t/∂z_t comes from that z. gain_first_order = lr·⟨∇ℓ_t, scale·d⟩. Then θ1:
   every position re-scored, θ0 back bit for bit after each module.

Memory: 8 bytes per stepped float32 parameter in both passes (the weights, and ∇L turned into d in
place; the jvp takes d itself as its tangent and the scale multiplies its result), plus one
module's parameters copied while its θ1 forward runs (the largest is the embedding, V·d). In pass
1 the embedding's and the LM head's weight gradients are added into ∇L in place (probe/fused.py),
not made as (V, d) tensors first, and ∂ℓ/∂z is written into a gradient of the model's own output
shape, so the backward makes no second (P, V) tensor; the layers' activations are never alive beside
the float64 chunks of the loss (recomputed in the backward, one layer at a time: the same floats,
so ∇L is unchanged bit for bit). The teacher's logits stay in its own dtype (bfloat16: half the
bytes; the float64 passes upcast them exactly, so no number changes). In pass 2 the heap the JVP
freed is handed back before the θ1 forward copies its largest module. Cost per context: two
teacher forwards, student forward + backward + the layers once more, one JVP to the logits (≈ 3.5
eager forwards on CPU), one forward. grad_norm is ‖∇L‖, the same for every row of a group.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jvp

from teachdiag.contexts import Context
from teachdiag.probe.exact import select_params
from teachdiag.probe.forward import teacher_logits, trim_heap
from teachdiag.probe.fused import grads_in_place
from teachdiag.probe.recompute import recomputed_layers
from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import SIGNALS, kls_from_logits, loss_grad, row_dot, signals_from_logits
from teachdiag.probe.stepfile import load_tensors, read_header, save_tensors
from teachdiag.probe.steps import global_norm, rule, stepped


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


class SharedStep:
    """Holds one shared step (∇L, the θ0 signals of its contexts); `run` takes it for a group of contexts."""

    def __init__(self, model: nn.Module, params: str, loss: str, optimizer: str, lr: float, vocab: int,
                 top_k: int = 16, first_order: bool = True, keep: torch.Tensor | None = None,
                 signals: str = "full") -> None:
        """keep: None, or bool (vocab,): the ids both tokenizers agree on (signals.py); signals:
        where H, D, C come from (signals.SIGNAL_MODES)."""
        self.model, self.loss, self.lr, self.vocab, self.top_k = model, loss, float(lr), vocab, top_k
        self.keep, self.signals, self.first_order = keep, signals, first_order
        self.rule = rule(optimizer)
        self.named = select_params(model, params)
        self.params = [p for _, p in self.named]
        for name, p in self.named:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"stepped parameter {name} is {p.dtype}; keep the student in float32")
        self.grads: list[torch.Tensor] | None = None  # ∇L of the held step (d(∇L) once stepped: in place)
        self.directions: list[torch.Tensor] | None = None
        self.scale = 1.0
        self.before: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # c -> signals (P,), ok (P,)
        self.grad_norm = math.nan  # ‖∇L‖ of the held step
        self.n_skipped = 0  # positions of the held step left out of L (their loss is not finite)

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int],
            device, progress=None) -> dict[int, list[dict]]:
        """Rows of every position of the group's contexts, after ONE step on their mean loss.

        progress: an optional callable(n_positions, phase) for a progress bar."""
        try:
            self.gradient(teacher, ctxs, by_ctx, group, device, progress)
            return self.rescore(teacher, ctxs, by_ctx, group, device, progress)
        finally:
            self.release()

    def gradient(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int],
                 device, progress=None) -> None:
        """Pass 1: ∇L over the group's positions and the signals before the step (module docstring, 1)."""
        self.release()
        n_total = sum(len(by_ctx[c]) for c in group)
        n_used = 0
        for p in self.params:
            p.grad = None
            p.requires_grad_(True)
        try:
            for c in group:
                ctx, positions = ctxs[c], by_ctx[c]
                t = teacher_logits(teacher, ctx, positions, self.vocab, device, dtype=None)  # (P, V), its own dtype
                ids, keep, y = self._view(ctx, positions, device)
                use = self._usable(t, y)
                n_used += int(use.sum())
                with torch.enable_grad(), grads_in_place(self.model, self.params), recomputed_layers(self.model):
                    rows = self._logits(ids, keep, cut=False)  # (1, P, V_rows), its graph reaches the stepped parameters
                    z = rows[0, :, : self.vocab].detach()  # (P, V)
                    if use.any():  # gradients accumulate over contexts; embedding and head without a V×d temporary
                        # ∂ℓ/∂z written into a gradient of the model's own output shape (0 beyond the vocabulary),
                        # so the backward of the cut [0, :, :V] allocates no second (P, V_rows) tensor
                        g = torch.zeros_like(rows)
                        self._delta(z, t, y, use, n_total, out=g[0, :, : self.vocab])
                        rows.backward(g)
                        del g
                    del rows
                sig = signals_from_logits(z, t, y, self.top_k, self.keep, self.signals)
                ok = torch.isfinite(z).all(1) & torch.isfinite(t).all(1)
                self.before[c] = ({k: v.cpu() for k, v in sig.items()}, ok.cpu())
                del t, z, sig
                trim_heap()
                if progress:
                    progress(len(positions), "gradient")
        except BaseException:  # nothing half-accumulated stays on the student
            for p in self.params:
                p.grad = None
            raise
        finally:
            for p in self.params:
                p.requires_grad_(False)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        if 0 < n_used < n_total:  # the mean is over the usable positions only
            for g in grads:
                g.mul_(n_total / n_used)
        self.grads, self.n_skipped = grads, n_total - n_used
        self.grad_norm = global_norm(grads)

    def rescore(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int],
                device, progress=None) -> dict[int, list[dict]]:
        """Pass 2 for the contexts of `group` (all of them stepped by the held step): their rows."""
        if self.directions is None:  # adam overwrites ∇L with its direction: no second copy
            self.directions, self.scale = self.rule.direction(self.grads, self.grad_norm)
            self.grads = None
        rows: dict[int, list[dict]] = {}
        for c in group:
            ctx, positions = ctxs[c], by_ctx[c]
            t = teacher_logits(teacher, ctx, positions, self.vocab, device, dtype=None)  # (P, V), as in pass 1
            ids, keep, y = self._view(ctx, positions, device)
            g_dot_d = self._directional(ids, keep, t, y) if self.first_order else [math.nan] * len(positions)
            trim_heap()  # the JVP's freed pages, before the θ1 forward copies the largest module
            with torch.no_grad(), stepped(self.model, self.named, self.directions, self.lr, self.scale):
                z1 = self._logits(ids, keep)  # (P, V) at θ1; the weights are θ0 again when it returns
            after = kls_from_logits(z1, t, self.keep)
            sig, ok = self.before[c]
            ok = (ok & torch.isfinite(z1).all(1).cpu()).tolist()
            sig = {k: v.tolist() for k, v in sig.items()}
            fkl1, rkl1 = after["fkl"].tolist(), after["rkl"].tolist()
            rows[c] = [make_row({k: v[i] for k, v in sig.items()}, fkl1[i], rkl1[i], self.grad_norm,
                                self.lr * g_dot_d[i], ok[i]) for i in range(len(positions))]
            del t, z1, after
            trim_heap()
            if progress:
                progress(len(positions), "re-score")
        return rows

    def release(self) -> None:
        """Let go of the held step (θ0 is in the weights whenever this can be called)."""
        self.grads = self.directions = None
        self.before = {}

    def _logits(self, ids: torch.Tensor, keep: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """(P, V) float32 student logits at sequence indices `keep` of ids (T,); cut=False: the model's
        output itself, (1, P, V_rows) (V_rows ≥ V when the head is padded beyond the vocabulary)."""
        z = self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False).logits.float()
        return z[0, :, : self.vocab] if cut else z

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

    def _delta(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, use: torch.Tensor, divisor: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """(P, V) ∂(Σ_t ℓ_t / divisor)/∂z over the usable rows (chunked: signals.loss_grad); 0 elsewhere.
        out: a zero (P, V) tensor to write it into."""
        if use.all():
            return loss_grad(z, t, y, self.loss, self.keep, divisor, out=out)
        delta = torch.zeros_like(z) if out is None else out
        delta[use] = loss_grad(z[use], t[use], y[use], self.loss, self.keep, divisor)  # rows chosen before the loss
        return delta

    def _directional(self, ids, keep, t: torch.Tensor, y: torch.Tensor) -> list[float]:
        """⟨∇ℓ_t(θ0), scale·d⟩ for each position of one context, float64 list (nats per unit lr).

        By the chain rule it is scale·⟨∂ℓ_t/∂z_t, ż_t⟩ with ż = J_z·d, the logits' directional
        derivative: one forward-mode pass to the logits (not through the float64 loss) that also
        returns the θ0 logits z, from which ∂ℓ_t/∂z_t is taken (NaN on rows left out of L)."""
        primals = {n: p.detach() for n, p in self.named}
        tangents = {n: d for (n, _), d in zip(self.named, self.directions)}  # d itself, not a scaled copy

        def logits(stepped: dict) -> torch.Tensor:
            z = functional_call(self.model, stepped, (), {"input_ids": ids[None], "logits_to_keep": keep,
                                                          "use_cache": False}, strict=False)
            return z.logits[0, :, : self.vocab].float()

        with eager_attention(self.model), torch.no_grad():
            z, dz = jvp(logits, (primals,), (tangents,))  # (P, V) each
        use = self._usable(t, y)
        delta = self._delta(z, t, y, use, 1).masked_fill_(~use[:, None], math.nan)  # each row's own ∂ℓ_t/∂z_t
        return (row_dot(delta, dz) * self.scale).tolist()

    # --- the held step saved for --resume (probe/stepfile.py) ---

    def _meta(self, group: list[int], by_ctx: dict[int, list[int]]) -> dict[str, str]:
        """What a saved step must agree on to be this step: its contexts, their positions, loss, parameters."""
        return {"contexts": json.dumps(group), "positions": json.dumps([len(by_ctx[c]) for c in group]),
                "loss": self.loss, "params": json.dumps([n for n, _ in self.named])}

    def saved_bytes(self, group: list[int], by_ctx: dict[int, list[int]]) -> int:
        """The size of save()'s file for `group`: ∇L, and per position the signals (float64) and ok."""
        n = sum(len(by_ctx[c]) for c in group)
        return sum(p.numel() * p.element_size() for p in self.params) + n * (8 * len(SIGNALS) + 1) + 2**16

    def save(self, path: Path, group: list[int], by_ctx: dict[int, list[int]]) -> None:
        """Write the held step (after gradient(), before rescore()) to `path`, atomically."""
        tensors = {f"grad.{n}": g for (n, _), g in zip(self.named, self.grads)}
        for k in self.before[group[0]][0]:
            tensors[f"before.{k}"] = torch.cat([self.before[c][0][k] for c in group])  # (P_group,)
        tensors["before.ok"] = torch.cat([self.before[c][1] for c in group]).to(torch.uint8)
        save_tensors(path, tensors, dict(self._meta(group, by_ctx), n_skipped=str(self.n_skipped)))

    def matches(self, path: Path, group: list[int], by_ctx: dict[int, list[int]]) -> bool:
        """Whether `path` holds this step for `group` (same contexts, positions, loss, parameters)."""
        got = read_header(path)
        if got is None:
            return False
        entries, meta = got[0], got[1]
        same = all(meta.get(k) == v for k, v in self._meta(group, by_ctx).items())
        return same and all(entries.get(f"grad.{n}") == (p.dtype, tuple(p.shape)) for n, p in self.named)

    def load(self, path: Path, group: list[int], by_ctx: dict[int, list[int]], device) -> bool:
        """Hold the step saved at `path` (as gradient() would have left it); False if it is unusable."""
        if not self.matches(path, group, by_ctx):
            return False
        got = load_tensors(path, "cpu")
        if got is None:
            return False
        self.release()
        self.grads = [got.pop(f"grad.{n}").to(p.device) for n, p in self.named]
        ok = got.pop("before.ok").bool()
        sig = {k[len("before."):]: v for k, v in got.items()}
        a = 0
        for c in group:
            b = a + len(by_ctx[c])
            self.before[c] = ({k: v[a:b] for k, v in sig.items()}, ok[a:b])
            a = b
        self.n_skipped = int(read_header(path)[1]["n_skipped"])
        self.grad_norm = global_norm(self.grads)
        return True
