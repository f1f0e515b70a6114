"""The embedding's and the LM head's weight gradients added straight into .grad, without a V×d temporary.

    from teachdiag.probe.fused import grads_in_place
    with grads_in_place(model, params):      # params: the parameters being differentiated
        model(input_ids=ids).logits.backward(delta)
    # .grad of the embedding and head weights holds what autograd would have accumulated there

Why: autograd makes a (V, d) gradient for the LM head and another for the input embedding and,
for a tied pair, holds the first through the whole backward to add the second to it before
adding the sum to .grad. At a 151,936-id vocabulary that is 0.55 GB each for a 0.5B student
(2.2 GB at 3B), at the peak of the shared step's gradient pass. Here the head's backward does
.grad += gᵀh in place (addmm_) and the embedding's .grad[ids] += g (index_add_): the same sums, in
another order (float32 rounding, ~1e-7 relative in ∇L), and no (V, d) tensor beyond .grad itself.

Only a plain nn.Embedding (no max_norm, no scale_grad_by_freq, not sparse) and a bias-free
nn.Linear head are taken over; anything else keeps autograd's own path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _grad_of(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


class _Head(torch.autograd.Function):
    """z = h·Wᵀ; backward: W.grad += gᵀh in place, and ∂/∂h = g·W."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # the weight itself, not saved_tensors: under saved-tensor hooks (checkpointing, CPU offload)
        # those give back another tensor object, and a .grad set on it would be lost
        ctx.save_for_backward(h)
        ctx.weight = weight
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h,), weight = ctx.saved_tensors, ctx.weight
        with torch.no_grad():
            _grad_of(weight).addmm_(g.reshape(-1, g.shape[-1]).t(), h.reshape(-1, h.shape[-1]))  # (V, d)
        return (g @ weight if ctx.needs_input_grad[0] else None), None


class _Embed(torch.autograd.Function):
    """e = W[ids]; backward: W.grad[ids] += g in place (nothing at padding_idx, as nn.Embedding)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ids, g = ids.reshape(-1), g.reshape(-1, g.shape[-1])  # (N,), (N, d)
        if ctx.padding_idx is not None:
            g = g.masked_fill((ids == ctx.padding_idx)[:, None], 0.0)
        with torch.no_grad():
            _grad_of(ctx.weight).index_add_(0, ids, g)
        return None, None, None


@contextlib.contextmanager
def grads_in_place(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Inside, backward passes add the input embedding's and LM head's weight gradients into their
    .grad in place (module docstring), for those of `params` that are such weights."""
    wanted = {id(p) for p in params}
    patched = []
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (type(emb) is nn.Embedding and id(emb.weight) in wanted and emb.max_norm is None
            and not emb.scale_grad_by_freq and not emb.sparse):
        emb.forward = lambda ids: _Embed.apply(ids, emb.weight, emb.padding_idx)
        patched.append(emb)
    if type(head) is nn.Linear and head.bias is None and id(head.weight) in wanted:
        head.forward = lambda h: _Head.apply(h, head.weight)
        patched.append(head)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again
