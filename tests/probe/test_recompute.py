"""probe/recompute.py: recomputed decoder layers give autograd's own gradients bit for bit, and keep
only the layers' inputs from the forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from teachdiag.probe.fused import grads_in_place
from teachdiag.probe.recompute import decoder_layers, recomputed_layers

MODELS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
          "llama": (LlamaConfig, LlamaForCausalLM)}


def _model(kind: str, tied: bool = False):
    torch.manual_seed(0)
    config, cls = MODELS[kind]
    cfg = config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied, pad_token_id=3)
    return cls(cfg).float().eval()


def _grads(model, recompute: bool, saved: list | None = None):
    """∇ over two backwards (accumulating, as the shared step's contexts do), with the embedding and
    head taken over as in the shared step; saved: gets the bytes each forward keeps for its backward."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    for k in range(2):
        ids = torch.tensor([[1, 5, 9, 3, 5, 7, 5, 11, 2]]) + k
        kept = [0]

        def pack(t):
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), grads_in_place(model, params), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with recomputed_layers(model) if recompute else torch.enable_grad():
                z = model(input_ids=ids, logits_to_keep=torch.tensor([2, 5, 8]), use_cache=False).logits
            z.backward(torch.randn(z.shape, generator=torch.Generator().manual_seed(k)))
        if saved is not None:
            saved.append(kept[0])
    for p in params:
        p.requires_grad_(False)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("tied", [True, False])
def test_recomputed_gradients_equal_autograds_bit_for_bit(kind, tied, one_thread):
    model = _model(kind, tied)
    want, got = _grads(model, False), _grads(model, True)
    for (name, _), a, b in zip(model.named_parameters(), want, got):
        assert torch.equal(a, b), name


def test_the_layers_keep_only_their_inputs_and_run_twice(one_thread):
    model = _model("qwen2")
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in layers]
    plain, recomputed = [], []
    _grads(model, False, plain)
    calls.clear()
    _grads(model, True, recomputed)
    for h in hooks:
        h.remove()
    # the forward hook sits outside the checkpoint, so the recompute inside runs the layer's body
    # without a second hook call; the body's own second run shows as the bytes not kept
    assert len(calls) == 2 * len(layers)
    assert max(recomputed) < 0.5 * min(plain)
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again after


def test_a_model_without_decoder_layers_is_left_as_it_is():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with recomputed_layers(model) as n:
        assert n == 0
    assert decoder_layers(model) == []


def test_a_forward_set_on_the_instance_is_wrapped_and_put_back(one_thread):
    """A layer whose instance already has a forward (an accelerate hook, a patch) is recomputed
    through that forward, and has it again afterwards; the context manager nests."""
    model = _model("llama")
    layer = model.model.layers[0]
    seen = []

    def patched(*args, **kwargs):
        seen.append(1)
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = patched
    want = _grads(model, False)
    seen.clear()
    with recomputed_layers(model):
        got = _grads(model, True)
    assert len(seen) == 4  # 2 contexts: the forward and its recompute in the backward
    assert vars(layer)["forward"] is patched and "forward" not in vars(model.model.layers[1])
    assert all(torch.equal(a, b) for a, b in zip(want, got))
