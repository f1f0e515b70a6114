"""Decoder layers that keep only their inputs for the backward and run again to rebuild the rest.

    from teachdiag.probe.recompute import recomputed_layers
    with recomputed_layers(model):          # a no-op for a model without Hugging Face decoder layers
        model(input_ids=ids).logits.backward(delta)   # the same gradients, bit for bit

Why: a backward keeps every layer's intermediate activations (attention scores, the MLP's
intermediate, norms) alive from the forward until the backward reaches that layer. For one
256-token context of Qwen2.5-0.5B that is about 0.6 GB, held at the shared step's gradient pass
peak, beside the (P, V) logits and the float64 chunk of the loss. Under this context manager each
decoder layer saves only its inputs (torch.utils.checkpoint, non-reentrant) and runs its forward
again when the backward reaches it: one layer's activations live at a time, for the price of one
more forward of the layers per backward. The recomputed forward is the same floats (same inputs,
same kernels, dropout off in eval mode), so the gradients are those of the plain backward bit for
bit on one device; torch checks the recomputed tensors' shapes and dtypes.

The layers are the modules that are transformers' GradientCheckpointingLayer (the decoder layers
of every Hugging Face causal LM with gradient-checkpointing support). Transformers' own switch
(`gradient_checkpointing_enable`) only acts in training mode, which would also turn dropout on;
this one leaves the model's mode alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # an older transformers: no layer is recomputed
    GradientCheckpointingLayer = None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that recomputed_layers wraps (outermost only: none inside another)."""
    if GradientCheckpointingLayer is None:
        return []
    layers: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, GradientCheckpointingLayer):
                layers.append(child)
            else:
                visit(child)

    visit(model)
    return layers


@contextlib.contextmanager
def recomputed_layers(model: nn.Module) -> Iterator[int]:
    """Inside, each decoder layer's forward is checkpointed (module docstring); yields how many."""
    layers = decoder_layers(model)
    own = [vars(layer).get("forward") for layer in layers]  # a forward set on the instance (a hook, a patch)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)  # whichever it was
    try:
        yield len(layers)
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward
