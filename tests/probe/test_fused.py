"""probe/fused.py: the embedding's and head's weight gradients added in place equal autograd's own."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from teachdiag.probe.fused import grads_in_place


def _model(kind: str, tied: bool):
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=3)
        return Qwen2ForCausalLM(cfg).float()
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=3)
    return LlamaForCausalLM(cfg).float()


def _grads(model, fused: bool, hooks=contextlib.nullcontext):
    """∇ over two backwards (accumulating, as the shared step's contexts do), token 3 the padding id;
    hooks: a context manager around each forward and backward."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    for k in range(2):
        ids = torch.tensor([[1, 5, 9, 3, 5, 7, 5]]) + k
        with grads_in_place(model, params) if fused else torch.enable_grad(), hooks():
            z = model(input_ids=ids, use_cache=False).logits
            z.backward(torch.randn(z.shape, generator=torch.Generator().manual_seed(k)))
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_in_place_gradients_equal_autograds(kind, tied, one_thread):
    model = _model(kind, tied)
    want, got = _grads(model, False), _grads(model, True)
    for (name, _), a, b in zip(model.named_parameters(), want, got):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7 * float(a.abs().max())), name  # another order of the same sums
    if not tied:  # padding_idx 3 takes no embedding gradient (tied, its row still has the head's)
        assert model.get_input_embeddings().weight.grad[3].abs().max() == 0
    assert "forward" not in vars(model.get_input_embeddings()) and "forward" not in vars(model.get_output_embeddings())


def test_only_the_differentiated_weights_are_taken_over():
    model = _model("qwen2", False)
    head = model.get_output_embeddings()
    with grads_in_place(model, [head.weight]):
        assert "forward" in vars(head) and "forward" not in vars(model.get_input_embeddings())
    assert "forward" not in vars(head)


@pytest.mark.parametrize("tied", [True, False])
def test_saved_tensor_hooks_lose_no_gradient(tied, one_thread):
    """Under saved-tensor hooks (checkpointing, CPU offload) ctx.saved_tensors are other tensor
    objects: the head's .grad must still land on the parameter itself."""
    model = _model("qwen2", tied)
    plain = _grads(model, True)
    hooked = _grads(model, True, lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    for (name, _), a, b in zip(model.named_parameters(), plain, hooked):
        assert torch.equal(a, b), name
