"""Exact probes that share work between the positions of a context; same numbers as exact.py.

    from teachdiag.probe.fast import make_probe
    probe = make_probe(student, params="all", loss="reverse_kl", optimizer="normalized",
                       lr=1e-3, vocab=V)          # a BatchedProbe, HeadProbe or TopBlocksProbe
    rows = probe.run_context(student_ids, n_prompt, teacher_logits, positions)

--params all (and tied heads): one forward of the context gives every probed position's logits,
and one vmapped backward (autograd.grad with is_grads_batched) gives every position's own
gradient, (P, *param) per parameter, in chunks that fit `grad_bytes`. Only the forward after
each step stays per position: its weights differ.

--params lm_head (untied head): the step only changes W in z = W·h, and h does not move, so every
probed position of a context comes from ONE forward in closed form. With δ = ∂ℓ/∂z (V,), the
gradient is g = δ·hᵀ, ‖g‖ = ‖δ‖·‖h‖, and the stepped logits z1 = z − lr·scale·d·h are
    sgd:         z − lr·‖h‖²·δ
    normalized:  z − lr·(‖h‖/‖δ‖)·δ
    adam:        z_v − lr·Σ_k h_k·δ_v·h_k / (|δ_v·h_k| + eps)      (chunked over the vocabulary)
--params last:N (untied head): the hidden states entering block L−N are cached from one forward
of the context; each position then runs only the top N blocks, forward + backward + forward.
A tied head is also the input embedding, so stepping it moves every layer's input: those runs
(and --params all) use the plain per-position probe.
"""

from __future__ import annotations

import torch
from torch import nn

from teachdiag.errors import UnsupportedModel
from teachdiag.probe.exact import SingleStepProbe, decoder_blocks, select_params
from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import kls_from_logits, probe_loss, signals_from_logits


def _tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def make_probe(model: nn.Module, params: str, loss: str, optimizer: str, lr: float, vocab: int,
               top_k: int = 16, grad_bytes: int | None = None, keep: torch.Tensor | None = None,
               signals: str = "full") -> SingleStepProbe:
    """The fastest exact probe for this parameter set (all give the same numbers as exact.py).

    grad_bytes: memory for the per-position gradients of BatchedProbe; default a quarter of the
    free GPU memory on CUDA (a 0.5B student batches ~10 positions on an 80 GB GPU), 2 GiB on CPU.
    keep: the ids both tokenizers agree on, or None (SingleStepProbe)."""
    args = (model, params, loss, optimizer, lr, vocab, top_k, keep, signals)
    select_params(model, params)  # validates params (ValueError) before any choice
    head = model.get_output_embeddings()
    if params == "lm_head" and not _tied(model) and type(head) is nn.Linear and head.bias is None:
        return HeadProbe(*args)
    if params.startswith("last:") and not _tied(model):
        return TopBlocksProbe(*args)
    if grad_bytes is None:
        device = head.weight.device
        grad_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 2 << 30
    return BatchedProbe(*args, grad_bytes=grad_bytes)


def context_view(student_ids: torch.Tensor, n_prompt: int,
                 positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one forward for all `positions` needs: ids (T,) up to the last position's prefix,
    the sequence indices whose logits predict each position (P,), and the sampled tokens (P,)."""
    ids = student_ids[: n_prompt + max(positions)]
    keep = torch.tensor([n_prompt + j - 1 for j in positions], device=ids.device)
    return ids, keep, student_ids[[n_prompt + j for j in positions]]


class BatchedProbe(SingleStepProbe):
    """Before-logits and per-position gradients of a context from one forward and one vmapped backward."""

    def __init__(self, *args, grad_bytes: int = 2 << 30, **kw) -> None:
        super().__init__(*args, **kw)
        itemsize = self.params[0].element_size()
        self.chunk = max(1, min(64, grad_bytes // max(1, self.n_stepped * itemsize)))  # positions per backward

    def run_context(self, student_ids: torch.Tensor, n_prompt: int, teacher_logits: torch.Tensor,
                    positions: list[int]) -> list[dict[str, float]]:
        rows = []
        for a in range(0, len(positions), self.chunk):
            rows += self._chunk(student_ids, n_prompt, teacher_logits[a : a + self.chunk],
                                positions[a : a + self.chunk])
        return rows

    def _chunk(self, student_ids: torch.Tensor, n_prompt: int, t: torch.Tensor,
               positions: list[int]) -> list[dict[str, float]]:
        if len(positions) == 1:  # nothing to share; a vmapped backward of one costs more than a plain one
            return super().run_context(student_ids, n_prompt, t, positions)
        ids, keep, y = context_view(student_ids, n_prompt, positions)
        with self.differentiable():
            z = self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False).logits[0]
            z = z[:, : self.vocab].float()  # (P, V)
            losses = probe_loss(z, t, y, self.loss, reduce=False, keep=self.keep)  # (P,)
            eye = torch.eye(len(positions), dtype=losses.dtype, device=losses.device)
            # row i of each result is ∂ℓ_i/∂θ: causality keeps later tokens out of it
            grads = torch.autograd.grad(losses, self.params, grad_outputs=eye, is_grads_batched=True)
        z = z.detach()
        rows = []
        for i, j in enumerate(positions):
            g = [G[i] for G in grads]  # this position's gradient, one view per parameter
            pg = self.gradient_at(ids[: n_prompt + j], z[i : i + 1], t[i : i + 1], y[i : i + 1], g)
            rows.append(self.row(pg, self.stepped_logits(pg, self.lr), self.lr))
        return rows


class HeadProbe(SingleStepProbe):
    """--params lm_head with an untied, bias-free head: closed form from one forward per context."""

    checked = False  # set on the first context, once the closed form is known to fit the model

    def run_context(self, student_ids: torch.Tensor, n_prompt: int, teacher_logits: torch.Tensor,
                    positions: list[int]) -> list[dict[str, float]]:
        head = self.model.get_output_embeddings()
        w = head.weight  # (V_rows, d)
        captured = {}
        hook = head.register_forward_hook(lambda m, args, out: captured.update(h=args[0]))
        ids, keep, y = context_view(student_ids, n_prompt, positions)
        try:
            with torch.no_grad():
                z = self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False).logits[0]  # (P, V_rows)
        finally:
            hook.remove()
        h = captured["h"][0].float()  # (P, d): the head's input at each probed position
        # once per probe: the model's logits are lm_head(h), not post-processed (softcap, scale)
        if not self.checked and not torch.allclose(h @ w.T, z, rtol=1e-4, atol=1e-4):
            raise UnsupportedModel("this model's logits are not lm_head(h); use --params last:1", field="--params")
        self.checked = True
        z = z.float()
        t = teacher_logits  # (P, V)
        zv = z[:, : self.vocab].detach().requires_grad_(True)
        with torch.enable_grad():
            # (P, V): ∂ℓ_j/∂z_j, exactly 0 on ids outside keep (the loss never sees them), so the
            # step below leaves their logits where they are, as the plain probe's step does
            (delta,) = torch.autograd.grad(probe_loss(zv, t, y, self.loss, keep=self.keep), zv)
        delta = delta.float()
        dz, grad_norm, g_dot_d = self._closed_form(h, delta)  # (P, V), (P,), (P,)
        z = z[:, : self.vocab]
        # all positions at once: signals before, and after z1 = (W − lr·scale·D)·h = z − lr·dz
        before = {k: v.tolist() for k, v in signals_from_logits(z, t, y, self.top_k, self.keep, self.signals).items()}
        after = kls_from_logits(z.double() - self.lr * dz.double(), t, self.keep)  # exact step
        fkl_after, rkl_after = after["fkl"].tolist(), after["rkl"].tolist()
        ok = (torch.isfinite(z).all(1) & torch.isfinite(t).all(1) & torch.isfinite(dz).all(1)).tolist()
        return [make_row({k: v[i] for k, v in before.items()}, fkl_after[i], rkl_after[i], grad_norm[i],
                         self.lr * g_dot_d[i], ok[i])
                for i in range(len(positions))]

    def _closed_form(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
        """(dz (P, V) with z1 = z − lr·dz, ‖g‖, ⟨g, scale·d⟩) from h (P, d) and δ = ∂ℓ/∂z (P, V).

        g = δ·hᵀ and z1 − z = −lr·scale·d(g)·h. Rules with d = g: d·h = ‖h‖²·δ, so no (V, d)
        gradient is ever formed. Elementwise rules (adam) need d(g), built a block of rows at a
        time so memory stays at (4096, d)."""
        dn = torch.linalg.vector_norm(delta.double(), dim=1)  # (P,)
        hn = torch.linalg.vector_norm(h.double(), dim=1)  # (P,)
        grad_norm = dn * hn  # ‖δ·hᵀ‖ = ‖δ‖·‖h‖
        r = self.rule
        if r.elementwise is None:
            scale = torch.tensor([r.scale(float(n)) for n in grad_norm], dtype=torch.float64, device=hn.device)
            dz = ((hn**2) * scale)[:, None].float() * delta
            return dz, grad_norm.tolist(), r.first_order_from(grad_norm).tolist()
        dz, inner = torch.empty_like(delta), torch.zeros_like(dn)
        for i in range(len(h)):
            for a in range(0, delta.shape[1], 4096):
                g = delta[i, a : a + 4096, None] * h[i][None, :]  # (C, d) rows of the gradient
                inner[i] += r.inner(g)
                dz[i, a : a + 4096] = r.elementwise(g) @ h[i]
        return dz, grad_norm.tolist(), r.first_order_from(grad_norm, inner).tolist()


class TopBlocksProbe(SingleStepProbe):
    """--params last:N with an untied head: the blocks below the stepped ones run once per context."""

    def __init__(self, model: nn.Module, params: str, *args, **kw) -> None:
        super().__init__(model, params, *args, **kw)
        self.blocks = decoder_blocks(model)
        self.first = len(self.blocks) - int(params.split(":", 1)[1])  # the lowest stepped block
        self.params_spec = params
        self.cache: torch.Tensor | None = None  # (1, T, d) input of block `first` over the context
        self.checked = False  # the cached path is compared with a full forward once, on real input

    def run_context(self, student_ids: torch.Tensor, n_prompt: int, teacher_logits: torch.Tensor,
                    positions: list[int]) -> list[dict[str, float]]:
        if self.first == 0:  # every block is stepped: nothing to cache
            return super().run_context(student_ids, n_prompt, teacher_logits, positions)
        self.cache = self._block_input(student_ids[: n_prompt + max(positions)])
        try:
            if not self.checked:  # a model whose blocks do not fit the skip (older layer loops, tuple outputs)
                prefix = student_ids[: n_prompt + positions[0]]
                with torch.no_grad():
                    fast, full = self._last_logits(prefix), SingleStepProbe._last_logits(self, prefix)
                if fast.shape != full.shape or not torch.allclose(fast, full, rtol=1e-4, atol=1e-4):
                    raise UnsupportedModel(f"{self.params_spec}: skipping the lower blocks of "
                                     f"{type(self.model).__name__} changes its logits; use --params all")
                self.checked = True
            return super().run_context(student_ids, n_prompt, teacher_logits, positions)
        finally:
            self.cache = None

    def _block_input(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, T, d) hidden states entering block `first` for ids (T,), from a forward that stops there."""
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
            raise _Stop  # nothing above this block is needed now

        hook = self.blocks[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=ids[None], use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured["h"]

    def _last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """As the parent's, but blocks below `first` are skipped and their output read from the cache."""
        if self.cache is None:
            return super()._last_logits(ids)
        cached = self.cache[:, : len(ids)]

        def swap(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=cached)
            return (cached, *args[1:]), kwargs

        lower = [self.blocks[i] for i in range(self.first)]
        for i in range(self.first):
            self.blocks[i] = _Pass(lower[i])
        hook = self.blocks[self.first].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            return super()._last_logits(ids)
        finally:
            hook.remove()
            for i, block in enumerate(lower):
                self.blocks[i] = block


class _Stop(Exception):
    """Ends the caching forward at the first stepped block."""


class _Pass(nn.Module):
    """Stands in for a block whose output is cached: returns its input unchanged. Keeps the
    attributes the decoder loop may read from a block (attention_type in transformers 4.5x)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name in ("attention_type", "layer_idx"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states
