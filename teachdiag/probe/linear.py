"""First-order ("linear") probe mode: lr·⟨g, d⟩ for a batch of positions, no step, no per-position backward.

    from teachdiag.probe.linear import first_order_rows
    rows = first_order_rows(student, "all", prefixes, teacher_logits, token_ids,
                            loss="reverse_kl", optimizer="normalized", lr=1e-3, vocab=V)
    rows[b]["gain_first_order"], rows[b]["grad_norm"]   # the *_after columns are NaN

The exact probe (exact.py) needs one backward per position to get that position's gradient
g_b. Here the B positions go through ONE left-padded forward and ONE backward of Σ_b ℓ_b:
positions are independent rows of the batch, so the gradient reaching row b of any module's
output is ℓ_b's alone. Forward hooks keep each module's input A_b; autograd.grad is asked
for the gradients G_b of the hooked modules' *outputs* only, so the summed weight gradients
are never computed. Per-sample norms then come from the factors (Opacus "ghost clipping"):

    nn.Linear weight   g_b = G_bᵀA_b     ‖g_b‖² = Σ (A_bA_bᵀ)∘(G_bG_bᵀ), or G_bᵀA_b materialized
                                          when T·(in+out) ≥ in·out makes that cheaper
    nn.Linear bias     g_b = Σ_t G_b[t], materialized (B, out)
    nn.Embedding       g_b = Σ_t e_{x_t} ⊗ G_b[t]: rows summed per distinct token, then normed
    tied head+embedding the two uses add, so the cross term 2⟨g_head, g_emb⟩ is included
    anything else      (RMSNorm weights, Qwen3's q_norm/k_norm) per-sample gradients
                       materialized by torch.func vmap of the module's own vjp: exact for any
                       module that treats batch rows independently and takes one tensor input

Memory: all G_b are held until the backward ends, about one more copy of the activations;
size B to fit. Padded rows need no mask: their G is exactly 0 (checked for sdpa and eager).
A stepped parameter must be used only inside the forward of the module that owns it (true
for Llama/Qwen, whose tied lm_head is still called as a module); an owner that the forward
never calls is accepted only if its parameters get no gradient at all.

An elementwise step rule's Σ g·d(g) (adam's Σ g²/(|g|+eps)) is no Gram product, so then every parameter's
per-sample gradients are materialized, a chunk of samples at a time (MATERIALIZE_CAP).
Grams are float32 matmuls whose elementwise product is summed in float64. On the 135M student
float64 Grams changed nothing (both within 1e-5 of a float64 model) and cost 1.4x the time:
the float32 activations, not the Grams, limit the accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from teachdiag.errors import UnsupportedModel
from teachdiag.probe.exact import select_params
from teachdiag.probe.forward import pad_left
from teachdiag.probe.rows import make_row
from teachdiag.probe.signals import probe_loss, signals_from_logits
from teachdiag.probe.steps import StepRule, rule

MATERIALIZE_CAP = 1 << 26  # elements of per-sample gradient held at once (256 MiB in float32)


class _Uses:
    """Everything one stepped parameter's per-sample gradient is made of, over all its uses.

    dense: (L (B,T,out), R (B,T,in)) pairs, g_b += Σ_t L_b[t] ⊗ R_b[t]   (nn.Linear weight)
    rows:  (idx (B,T), R (B,T,in)) pairs,   g_b += Σ_t e_{idx_b[t]} ⊗ R_b[t] (nn.Embedding)
    full:  (B, *shape) per-sample gradients already materialized            (everything else)
    """

    def __init__(self, param: nn.Parameter) -> None:
        self.shape, self.device, self.dense, self.rows, self.full = param.shape, param.device, [], [], None

    def add_full(self, g: torch.Tensor) -> None:
        self.full = g if self.full is None else self.full + g

    def stats(self, b: int, elem: StepRule | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(‖g_b‖², Σ g_b·d(g_b) or None): float64 (B,); elem: the step rule when it is elementwise."""
        if not (self.dense or self.rows or self.full is not None):  # owner never called: unused
            zero = torch.zeros(b, dtype=torch.float64, device=self.device)
            return zero, (zero if elem else None)
        # uses of one kind concatenate along T: Σ_u L_uᵀR_u = [L_1; L_2]ᵀ[R_1; R_2]
        dense = [torch.cat(f, 1) for f in zip(*self.dense)] if self.dense else None
        rows = [torch.cat(f, 1) for f in zip(*self.rows)] if self.rows else None
        if rows is not None and dense is None and self.full is None:
            return _rows_stats(*rows, elem)
        if elem or self.full is not None or (dense is not None and _materialize_is_cheaper(*dense)):
            return _materialized_stats(self.shape, dense, rows, self.full, elem)
        out, inn = dense  # (B, T, out), (B, T, in)
        sq = ((out @ out.mT).double() * (inn @ inn.mT).double()).sum((1, 2))  # ghost norm
        if rows is not None:
            idx, r = rows  # (B, S), (B, S, in): the head's dlogits at the embedded tokens
            at_tokens = out.gather(2, idx[:, None, :].expand(-1, out.shape[1], -1))  # (B, T, S)
            sq = sq + 2 * (at_tokens.double() * (inn @ r.mT).double()).sum((1, 2)) + _rows_stats(idx, r, None)[0]
        return sq, None


def _materialize_is_cheaper(out: torch.Tensor, inn: torch.Tensor) -> bool:
    """Ghost costs T²·(in+out) per sample, materializing G_bᵀA_b costs T·in·out."""
    return out.shape[1] * (out.shape[2] + inn.shape[2]) >= out.shape[2] * inn.shape[2]


def _rows_stats(idx: torch.Tensor, r: torch.Tensor, elem: StepRule | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An embedding's per-sample gradient has one nonzero row per distinct (sample, token)."""
    b, _, width = r.shape
    n = int(idx.max()) + 1
    key = torch.arange(b, device=idx.device)[:, None] * n + idx  # (B, S) one key per (sample, token)
    uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
    summed = r.new_zeros(len(uniq), width).index_add_(0, inv, r.reshape(-1, width))  # (U, in)
    owner = uniq // n  # (U,) the sample each row belongs to
    sq = torch.zeros(b, dtype=torch.float64, device=r.device)
    sq.index_add_(0, owner, summed.double().square().sum(1))
    if not elem:
        return sq, None
    ad = torch.zeros_like(sq).index_add_(0, owner, elem.inner(summed, batch_dims=1))  # zero rows add 0
    return sq, ad


def _materialized_stats(shape, dense, rows, full, elem: StepRule | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample gradients built a chunk of samples at a time, so memory stays ≈ MATERIALIZE_CAP."""
    b = (dense or rows or [full])[0].shape[0]
    chunk = max(1, MATERIALIZE_CAP // math.prod(shape))
    sq, ad = [], []
    for lo in range(0, b, chunk):
        sl = slice(lo, lo + chunk)
        g = full[sl].clone() if full is not None else None
        if dense is not None:
            part = torch.einsum("bto,bti->boi", dense[0][sl], dense[1][sl])  # (c, out, in)
            g = part if g is None else g.add_(part)
        if rows is not None:
            idx, r = rows[0][sl], rows[1][sl]  # (c, S), (c, S, in)
            g = r.new_zeros(len(r), *shape) if g is None else g
            g.scatter_add_(1, idx[..., None].expand(-1, -1, r.shape[2]), r)
        # norms of rows, then float64: one float32 vector_norm over 28M entries is ~1e-3 off on CPU
        rows_of = g.reshape(len(g), -1, math.prod(shape[-1:]))  # (c, rows, last dim)
        sq.append(torch.linalg.vector_norm(rows_of, dim=2).double().square().sum(1))
        if elem:
            ad.append(elem.inner(g, batch_dims=1))
    return torch.cat(sq), (torch.cat(ad) if elem else None)


class _Recorder:
    """Forward hooks on every module that directly owns a stepped parameter."""

    def __init__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> None:
        stepped = {id(p): n for n, p in named}
        self.owners = [m for m in model.modules() if any(id(p) in stepped for p in m._parameters.values())]
        for m in self.owners:  # checked before the forward: max_norm renormalizes the weight in place
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
                raise UnsupportedModel("linear mode supports plain nn.Embedding "
                                 "(no max_norm, scale_grad_by_freq or sparse)", field="--mode")
        found = {id(p) for m in self.owners for p in m._parameters.values()}
        missing = [n for n, p in named if id(p) not in found]
        if missing:
            raise UnsupportedModel(f"no module owns the stepped parameters {missing}", field="--mode")
        self.stepped, self.calls, self.recording = stepped, [], True
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.owners]

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.recording:  # the vmap'd re-calls in _full_rule must not be recorded
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(tensors) != 1 or not isinstance(output, torch.Tensor):
            names = [self.stepped[id(p)] for p in module._parameters.values() if id(p) in self.stepped]
            raise UnsupportedModel(f"no per-sample gradient rule for {names} in {type(module).__name__}: "
                             "linear mode needs modules with one tensor input and one tensor output", field="--mode")
        self.calls.append((module, tensors[0].detach(), output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _full_rule(module: nn.Module, names: list[str], x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients {name: (B, *shape)} of a module's own parameters, by vmap of its vjp."""
    params = {n: module._parameters[n].detach() for n in names}

    def one(p, xb, gb):  # xb, gb: one sample, given back its batch dim of 1
        _, vjp = torch.func.vjp(lambda q: torch.func.functional_call(module, q, (xb[None],)), p)
        return vjp(gb[None])[0]

    with torch.enable_grad():
        return torch.func.vmap(one, in_dims=(None, 0, 0))(params, x, g)


def first_order_rows(model: nn.Module, params: str, prefixes: list[torch.Tensor], teacher_logits: torch.Tensor,
                     token_ids: list[int], loss: str, optimizer: str, lr: float, vocab: int,
                     top_k: int = 16, keep: torch.Tensor | None = None,
                     signals: str = "full") -> list[dict[str, float]]:
    """SingleStepProbe's rows for B positions, with gain_first_order = lr·⟨g_b, d_b⟩ instead of a step.

    prefixes: B tensors (L_b,) of student input ids; teacher_logits: (B, V) float32, row b the
    teacher's distribution for the token after prefixes[b]; token_ids: the B sampled tokens.
    The measured-after columns (rows.MEASURED) are NaN. The model's weights are not written.
    keep: None, or bool (V,): the ids both tokenizers agree on (signals.py).
    """
    step = rule(optimizer)
    elem = step if step.elementwise is not None else None
    named = select_params(model, params)
    for name, p in named:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"stepped parameter {name} is {p.dtype}; keep the student in float32")
    t = teacher_logits.float()  # (B, V)
    y = torch.as_tensor(token_ids, device=t.device).long()  # (B,)
    batch = pad_left(prefixes)
    was = [p.requires_grad for _, p in named]
    recorder = _Recorder(model, named)
    try:
        for _, p in named:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model(**batch, logits_to_keep=1, use_cache=False)
            s = out.logits[:, -1, :vocab].float()  # (B, V)
            recorder.recording = False
            uses = {id(p): _Uses(p) for _, p in named}
            # an owner the forward never called: fine if its parameters are unused (zero gradient),
            # not if the model used them outside that module (tied weights in F.linear): refuse
            called = {id(m) for m, _, _ in recorder.calls}
            idle = [p for m in recorder.owners if id(m) not in called
                    for p in m._parameters.values() if p is not None and id(p) in uses]
            outs = [o for _, _, o in recorder.calls]
            grads = torch.autograd.grad(probe_loss(s, t, y, loss, keep=keep), outs + idle, allow_unused=True)
            if any(g is not None for g in grads[len(outs):]):
                raise UnsupportedModel(f"{[recorder.stepped[id(p)] for p in idle]} are used outside the forward "
                                 "of the modules that own them; linear mode cannot attribute their gradient")
        for (module, x, o), g_out in zip(recorder.calls, grads[: len(outs)]):
            g_out = torch.zeros_like(o) if g_out is None else g_out
            mine = [n for n, p in module._parameters.items() if p is not None and id(p) in uses]
            b = x.shape[0]
            if isinstance(module, nn.Linear):
                for n in mine:
                    grad_out = g_out.reshape(b, -1, g_out.shape[-1])  # (B, T, out)
                    if n == "weight":
                        uses[id(module.weight)].dense.append((grad_out, x.reshape(b, -1, x.shape[-1])))
                    else:
                        uses[id(module.bias)].add_full(grad_out.sum(1))  # (B, out)
            elif isinstance(module, nn.Embedding):
                idx, grad_out = x.reshape(b, -1), g_out.reshape(b, -1, g_out.shape[-1])  # (B, T), (B, T, in)
                if module.padding_idx is not None:  # that row gets no gradient
                    grad_out = grad_out.masked_fill((idx == module.padding_idx)[..., None], 0)
                uses[id(module.weight)].rows.append((idx, grad_out))
            else:
                for n, g in _full_rule(module, mine, x, g_out).items():
                    uses[id(module._parameters[n])].add_full(g)
        parts = [u.stats(len(prefixes), elem) for u in uses.values()]
    finally:
        recorder.remove()
        for (_, p), w in zip(named, was):
            p.requires_grad_(w)
    sq = torch.stack([q for q, _ in parts]).sum(0)  # (B,) float64
    norm = sq.sqrt()
    inner = torch.stack([a for _, a in parts]).sum(0) if elem else None
    gain = lr * step.first_order_from(norm, inner)  # (B,)

    s = s.detach()
    before = {k: v.tolist() for k, v in signals_from_logits(s, t, y, top_k, keep, signals).items()}
    ok = (torch.isfinite(s).all(1) & torch.isfinite(t).all(1)).tolist()
    return [make_row({k: v[i] for k, v in before.items()}, math.nan, math.nan, float(norm[i]), float(gain[i]), ok[i])
            for i in range(len(prefixes))]
