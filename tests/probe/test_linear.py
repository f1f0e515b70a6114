"""Linear (first-order) mode: batched per-position gradient norms against one autograd.grad per position."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import teachdiag.probe.linear as linear
from conftest import make_model
from reference import full_logits, naive_probe, reference_loss, reference_params
from teachdiag.probe.linear import first_order_rows
from teachdiag.probe.rows import MEASURED
from teachdiag.probe.exact import SingleStepProbe
from teachdiag.probe.steps import ADAM_EPS
from teachdiag.errors import UnsupportedModel

VOCAB = 68  # the test tokenizer's length (conftest); the models have 128 (padded) rows
LR = 1e-3
LOSSES = ("reverse_kl", "forward_kl", "sampled_token")
OPTIMIZERS = ("sgd", "normalized", "adam")
TOL = {"sgd": 1e-4, "normalized": 1e-4, "adam": 1e-3}


@pytest.fixture(scope="module")
def models():
    """Qwen2 untied, Qwen3 (q_norm/k_norm), Llama tied with 3 blocks (like llama_pair's student)."""
    return {"qwen2": make_model("qwen2", 128, 2).eval(), "qwen3": make_model("qwen3", 128, 2).eval(),
            "llama": make_model("llama", 128, 2, tied=True, layers=3).eval()}


def make_batch(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]
    teacher = 3 * torch.randn(len(lens), VOCAB, generator=g)  # (B, V)
    tokens = torch.randint(0, VOCAB, (len(lens),), generator=g).tolist()
    return prefixes, teacher, tokens


def naive_grad_stats(model, params, prefix, teacher, token, loss):
    """(‖g‖, Σ g²/(|g|+eps)) from one unpadded full-sequence forward and autograd.grad, float64 sums."""
    chosen = reference_params(model, params)
    s = model(input_ids=prefix[None]).logits[0, -1, :VOCAB].double()
    value = reference_loss(s, teacher.double(), token, loss)
    grads = [g.double() for g in torch.autograd.grad(value, chosen)]
    return math.sqrt(sum(float((g**2).sum()) for g in grads)), sum(float((g * g / (g.abs() + ADAM_EPS)).sum())
                                                                  for g in grads)


def assert_matches_naive(model, params, prefixes, teacher, tokens, losses=LOSSES, optimizers=OPTIMIZERS):
    for loss in losses:
        ref = [naive_grad_stats(model, params, p, teacher[b], tokens[b], loss) for b, p in enumerate(prefixes)]
        for opt in optimizers:
            rows = first_order_rows(model, params, prefixes, teacher, tokens, loss, opt, LR, VOCAB)
            for row, (norm, adam_sum) in zip(rows, ref):
                gain = {"sgd": LR * norm**2, "normalized": LR * norm, "adam": LR * adam_sum}[opt]
                # sampled_token's gradient is c·∇log p_S(y) with c = log p_T(y) − log p_S(y): where c
                # is tiny (3e-4 at one position here), float32 logit noise in either computation moves
                # it by 1e-3 relative, and adam's g/(|g|+1e-8) is not even linear in c there
                c = row["teacher_logprob"] - row["student_logprob"]
                loose = loss == "sampled_token" and abs(c) < 1e-2
                rel = 1e-2 if loose else 1e-4
                assert row["grad_norm"] == pytest.approx(norm, rel=rel), (loss, opt)
                assert row["gain_first_order"] == pytest.approx(gain, rel=max(rel, TOL[opt])), (loss, opt)
                assert row["finite"] == 1


@pytest.mark.parametrize("params", ["all", "lm_head", "last:1"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_equals_naive_per_position(models, arch, params):
    # lengths 1..11 in one batch: up to 10 pad tokens per row must not leak into the norms
    assert_matches_naive(models[arch], params, *make_batch((7, 2, 11, 1, 5)))


@pytest.mark.parametrize("materialize", [False, True])
def test_ghost_and_materialized_paths_agree_with_naive(models, monkeypatch, materialize):
    """Force every Linear onto one path; a cap of 1 element makes the materialized path go one sample at a time."""
    monkeypatch.setattr(linear, "_materialize_is_cheaper", lambda *_: materialize)
    monkeypatch.setattr(linear, "MATERIALIZE_CAP", 1)
    for arch in ("qwen3", "llama"):
        assert_matches_naive(models[arch], "all", *make_batch((25, 3, 14), seed=1), losses=("reverse_kl",),
                             optimizers=("sgd",))


def test_before_signals_and_gains_equal_single_step_probe(pair):
    student = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    prefixes, teacher, tokens = make_batch((4, 9, 6), seed=2)
    for opt in OPTIMIZERS:
        rows = first_order_rows(student, "all", prefixes, teacher, tokens, "reverse_kl", opt, LR, VOCAB)
        probe = SingleStepProbe(student, "all", "reverse_kl", opt, LR, VOCAB)
        for b, row in enumerate(rows):
            exact = probe.probe_position(prefixes[b], teacher[b], tokens[b])
            assert list(row) == list(exact)  # same columns, same order
            for k, v in exact.items():
                if k in MEASURED:
                    assert math.isnan(row[k])
                else:
                    assert row[k] == pytest.approx(v, rel=1e-4 if k in ("grad_norm", "gain_first_order") else 1e-5,
                                                   abs=1e-6), k


def test_agrees_with_shared_naive_reference_tied(llama_pair, contexts):
    """Against tests/reference.naive_probe (deep copy, teacher model, full-sequence forwards)."""
    teacher, student = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in llama_pair)
    ctx = json.loads(open(contexts).readline())
    t_view = ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]
    s_ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    positions = [0, 2, 3]
    with torch.no_grad():
        t_logits = torch.stack([full_logits(teacher, t_view + ctx["response_ids"], len(t_view) + j - 1, VOCAB)
                                for j in positions])
    prefixes = [s_ids[: len(ctx["prompt_ids"]) + j] for j in positions]
    tokens = [ctx["response_ids"][j] for j in positions]
    rows = first_order_rows(student, "lm_head", prefixes, t_logits, tokens, "reverse_kl", "adam", 1e-4, VOCAB)
    for j, row in zip(positions, rows):
        ref = naive_probe(student, teacher, ctx, j, VOCAB, "reverse_kl", "adam", 1e-4, "lm_head")
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert row["gain_first_order"] == pytest.approx(1e-4 * ref["g_l1"], rel=1e-3)


def hook_state(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs")
    return [(n, len(getattr(m, a))) for n, m in model.named_modules() for a in names]


def test_weights_bit_identical_hooks_removed_requires_grad_kept(models):
    model = models["qwen3"]
    before, hooks = copy.deepcopy(model.state_dict()), hook_state(model)
    model.model.layers[0].requires_grad_(False)  # a mix of True and False to be given back as found
    flags = [p.requires_grad for p in model.parameters()]
    try:
        prefixes, teacher, tokens = make_batch((5, 8, 2), seed=3)
        for opt in OPTIMIZERS:
            first_order_rows(model, "all", prefixes, teacher, tokens, "reverse_kl", opt, LR, VOCAB)
        with pytest.raises(ValueError, match="unknown loss"):  # raised after the forward, hooks in place
            first_order_rows(model, "all", prefixes, teacher, tokens, "bogus", "sgd", LR, VOCAB)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert hook_state(model) == hooks and all(n == 0 for _, n in hooks)
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.requires_grad_(True)


def test_nonfinite_teacher_row_is_flagged_alone(models):
    prefixes, teacher, tokens = make_batch((4, 6, 3), seed=4)
    teacher[1, 5] = float("nan")
    rows = first_order_rows(models["qwen2"], "all", prefixes, teacher, tokens, "reverse_kl", "sgd", LR, VOCAB)
    assert [r["finite"] for r in rows] == [1, 0, 1]
    assert math.isnan(rows[1]["fkl"]) and math.isfinite(rows[2]["grad_norm"])


def test_refusals(models):
    prefixes, teacher, tokens = make_batch((3, 4))
    with pytest.raises(ValueError, match="float32"):
        first_order_rows(copy.deepcopy(models["qwen2"]).to(torch.bfloat16), "all", prefixes, teacher, tokens,
                         "reverse_kl", "sgd", LR, VOCAB)
    with pytest.raises(ValueError, match="unknown step rule"):
        first_order_rows(models["qwen2"], "all", prefixes, teacher, tokens, "reverse_kl", "lion", LR, VOCAB)
    model = copy.deepcopy(models["qwen2"])
    model.model.embed_tokens.max_norm = 1.0  # would renormalize the weight in place during the forward
    before = model.model.embed_tokens.weight.clone()
    with pytest.raises(UnsupportedModel, match="max_norm"):
        first_order_rows(model, "all", prefixes, teacher, tokens, "reverse_kl", "sgd", LR, VOCAB)
    assert torch.equal(model.model.embed_tokens.weight, before)


class OutsideHead(torch.nn.Module):
    """An LM head that uses another module's weight through F.linear, never calling that module."""

    def __init__(self, owner):
        super().__init__()
        self.__dict__["owner"] = owner  # not a child: the owner is registered elsewhere

    @property
    def weight(self):
        return self.owner.weight

    def forward(self, h):
        return torch.nn.functional.linear(h, self.owner.weight)


def test_uncalled_owners(models):
    prefixes, teacher, tokens = make_batch((3, 6), seed=5)
    base = first_order_rows(models["qwen2"], "all", prefixes, teacher, tokens, "reverse_kl", "sgd", LR, VOCAB)
    spare = copy.deepcopy(models["qwen2"])
    spare.model.spare = torch.nn.Linear(4, 4)  # stepped under "all" but never used: zero gradient
    rows = first_order_rows(spare, "all", prefixes, teacher, tokens, "reverse_kl", "sgd", LR, VOCAB)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in base], rel=1e-6)
    outside = copy.deepcopy(models["qwen2"])
    outside.model.holder = outside.lm_head  # owns the head weight, but the forward uses it via F.linear
    outside.lm_head = OutsideHead(outside.model.holder)
    with pytest.raises(UnsupportedModel, match="used outside"):
        first_order_rows(outside, "all", prefixes, teacher, tokens, "reverse_kl", "sgd", LR, VOCAB)
    assert all(n == 0 for _, n in hook_state(outside))


def test_eager_attention(models):
    model = copy.deepcopy(models["qwen3"])
    model.config._attn_implementation = "eager"  # masks by adding min-float, not by an sdpa bool mask
    assert_matches_naive(model, "all", *make_batch((9, 2, 5), seed=6), losses=("forward_kl",),
                         optimizers=("normalized",))


# ---------------------------------------------------------------- through the runner

def test_linear_mode_run_equals_the_exact_runs_first_order_column(tmp_path, pair, contexts):
    """--mode linear batches positions across contexts and writes the exact run's first-order
    column and signals; the measured columns stay empty and analyze needs --gain gain_first_order."""
    from teachdiag.cli import main
    from teachdiag.commands.probe import ProbeConfig, run_probe
    from teachdiag.table import read_tokens

    def run(name, **kw):
        cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / name),
                          device="cpu", quiet=True, positions="10", optimizer="sgd", lr=1e-3, **kw)
        return run_probe(cfg, [])

    exact = read_tokens(run("exact") / "tokens.csv")
    out = run("linear", mode="linear", batch=4)  # batches of 4 span several contexts
    linear = read_tokens(out / "tokens.csv")
    assert list(linear["context_id"]) == list(exact["context_id"])
    assert list(linear["position"]) == list(exact["position"])
    for col in ("fkl", "rkl", "compat_mass", "union_fkl", "teachability"):
        np.testing.assert_allclose(linear[col], exact[col], rtol=1e-5, atol=1e-7, err_msg=col)
    np.testing.assert_allclose(linear["grad_norm"], exact["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(linear["gain_first_order"], exact["gain_first_order"], rtol=1e-4)
    assert linear[["fkl_after", "gain_rkl", "rel_gain_fkl"]].isna().all().all()
    assert json.loads((out / "run.json").read_text())["step"]["mode"] == "linear"
    assert main(["analyze", str(out), "--bootstrap", "0", "--out", str(tmp_path / "a")]) == 2
    assert main(["analyze", str(out), "--gain", "gain_first_order", "--bootstrap", "0",
                 "--out", str(tmp_path / "a")]) == 0
