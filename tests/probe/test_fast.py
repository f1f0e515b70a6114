"""Top-of-network probes (lm_head closed form, last:N from cached states) equal the naive reference."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model
from reference import naive_probe
from teachdiag.probe.exact import SingleStepProbe
from teachdiag.commands.probe import ProbeConfig, run_probe
from teachdiag.table import read_tokens
from teachdiag.probe.fast import BatchedProbe, HeadProbe, TopBlocksProbe, make_probe
from teachdiag.errors import UnsupportedModel

VOCAB = 68
LR = {"sgd": 1e-3, "adam": 1e-4, "normalized": 1e-2}


@pytest.mark.parametrize("params", ["lm_head", "last:1", "last:2"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_untied_top_probes_equal_the_naive_reference(tmp_path, pair, contexts, params, optimizer):
    cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / "r"),
                      device="cpu", quiet=True, params=params, optimizer=optimizer, lr=LR[optimizer],
                      loss="forward_kl", positions="8")
    out = run_probe(cfg, [])
    kind = json.loads((out / "run.json").read_text())["step"]["probe"]
    assert kind == ("HeadProbe" if params == "lm_head" else "TopBlocksProbe")
    teacher, student = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in pair)
    ctxs = {c["id"]: c for c in map(json.loads, contexts.read_text().splitlines())}
    for row in read_tokens(out / "tokens.csv").itertuples():
        ref = naive_probe(student, teacher, ctxs[row.context_id], row.position, VOCAB, "forward_kl", optimizer,
                          LR[optimizer], params)
        assert row.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)
        for col in ("fkl", "rkl", "fkl_after", "rkl_after"):
            assert getattr(row, col) == pytest.approx(ref[col], rel=1e-5, abs=1e-6), col
        for col in ("gain_fkl", "gain_rkl"):
            assert getattr(row, col) == pytest.approx(ref[col], rel=2e-3, abs=2e-6), col
        assert abs(row.gain_fkl) > 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_the_bottom_runs_once_per_context_and_weights_come_back(arch):
    model = make_model(arch, 128, 2, layers=4).eval().requires_grad_(False)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    ids, teacher = torch.randint(0, 60, (30,)), torch.randn(5, VOCAB) * 3
    positions = [1, 4, 9, 16, 24]
    calls = {"block0": 0, "block3": 0, "head": 0}
    model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__("block0", calls["block0"] + 1))
    model.model.layers[3].register_forward_hook(lambda *a: calls.__setitem__("block3", calls["block3"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))

    head = make_probe(model, "lm_head", "reverse_kl", "adam", 1e-4, VOCAB)
    assert isinstance(head, HeadProbe)
    rows = head.run_context(ids, 5, teacher, positions)
    assert calls == {"block0": 1, "block3": 1, "head": 1}  # every position from one forward

    top = make_probe(model, "last:1", "reverse_kl", "sgd", 1e-3, VOCAB)
    assert isinstance(top, TopBlocksProbe)
    calls.update(block0=0, block3=0)
    rows_top = top.run_context(ids, 5, teacher, positions)
    # the cache, plus a full forward once per probe to check the skip; then fwd+bwd, fwd per position
    assert calls["block0"] == 2 and calls["block3"] == 2 * len(positions) + 2
    calls.update(block0=0, block3=0)
    top.run_context(ids, 5, teacher, positions)
    assert calls["block0"] == 1 and calls["block3"] == 2 * len(positions)  # later contexts: the cache only
    for k, v in model.state_dict().items():
        assert torch.equal(v, theta0[k]), k
    assert len(list(model.model.layers)) == 4 and all(type(b).__name__.endswith("DecoderLayer")
                                                       for b in model.model.layers)
    ref = SingleStepProbe(model, "lm_head", "reverse_kl", "adam", 1e-4, VOCAB).run_context(ids, 5, teacher, positions)
    for a, b in zip(rows, ref):
        assert a["gain_rkl"] == pytest.approx(b["gain_rkl"], rel=1e-3)
        assert a["gain_first_order"] == pytest.approx(b["gain_first_order"], rel=1e-4)
    assert all(r["finite"] == 1 for r in rows_top)


def test_tied_heads_use_the_batched_full_probe():
    model = make_model("llama", 128, 2, tied=True).eval()
    for params in ("lm_head", "last:1", "all"):
        assert type(make_probe(model, params, "reverse_kl", "sgd", 1e-3, VOCAB)) is BatchedProbe


def test_a_model_the_block_skip_does_not_fit_is_refused(monkeypatch):
    """If skipping the lower blocks changed the logits (an older decoder loop, blocks returning
    tuples), the first context says so instead of probing a different function."""
    model = make_model("qwen2", 128, 2, layers=3).eval().requires_grad_(False)
    probe = make_probe(model, "last:1", "reverse_kl", "sgd", 1e-3, VOCAB)
    real = probe._block_input  # a cache that is not what the block really sees
    monkeypatch.setattr(probe, "_block_input", lambda ids: real(ids) * 1.5)
    with pytest.raises(UnsupportedModel, match="changes its logits"):
        probe.run_context(torch.randint(0, 60, (12,)), 4, torch.randn(2, VOCAB), [2, 5])
