"""steps.stepped: a forward that sees θ1 module by module is the forward of the model stepped whole."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from teachdiag.probe.steps import apply_step, stepped


@pytest.fixture(scope="module")
def models(pair):
    return tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in pair)


def _directions(named, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for _, p in named]


@pytest.mark.parametrize("params", ["all", "some"])
def test_logits_equal_the_whole_model_stepped_in_place(models, one_thread, params):
    """Bit for bit, for every parameter or a few (the tied embedding among them when 'all'), and
    the weights are θ0 again afterwards."""
    student = models[1]
    named = list(student.named_parameters())
    if params == "some":
        named = [(n, p) for n, p in named if "layers.0." in n or "norm" in n]
    d = _directions(named)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    theta0 = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad(), stepped(student, named, d, 1e-2, 0.5) as stats:
        z = student(input_ids=ids, use_cache=False).logits
    assert all(torch.equal(theta0[k], v) for k, v in student.state_dict().items())
    assert 0 < stats.peak_bytes < sum(p.numel() * 4 for _, p in named)
    apply_step([p for _, p in named], d, 1e-2, 0.5)
    with torch.no_grad():
        want = student(input_ids=ids, use_cache=False).logits
    student.load_state_dict(theta0)
    assert torch.equal(z, want)


class _Reader(nn.Module):
    """A parent that reads its child's weight itself, outside the child's forward."""

    def __init__(self):
        super().__init__()
        self.child = nn.Linear(3, 3)

    def forward(self, x):
        return self.child(x) + x @ self.child.weight


def test_a_parameter_read_outside_its_module_is_refused_and_theta0_kept():
    model = _Reader()
    named = list(model.named_parameters())
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="child.weight is read outside"):
        with torch.no_grad(), stepped(model, named, _directions(named), 1e-1, 1.0):
            model(torch.ones(1, 3))
    assert all(torch.equal(theta0[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model.child._forward_pre_hooks and not model.child._forward_hooks


def test_a_forward_that_raises_midway_leaves_theta0():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    named = list(model.named_parameters())
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with torch.no_grad(), stepped(model, named, _directions(named), 1e-1, 1.0):
            model(torch.ones(1, 4))  # the first Linear is stepped, then its matmul fails
    assert all(torch.equal(theta0[k], v) for k, v in model.state_dict().items())
