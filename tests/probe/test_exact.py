"""The exact probe against a naive deep-copy reference, the first-order limit, and exact restore."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import naive_probe
from teachdiag.probe.exact import SingleStepProbe, select_params
from teachdiag.commands.probe import ProbeConfig, run_probe
from teachdiag.table import read_tokens
from teachdiag.errors import InputError

VOCAB = 68  # the test tokenizer's length (conftest)
LR = {"sgd": 1e-3, "adam": 1e-4, "normalized": 1e-2}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def read_contexts(path):
    return [json.loads(line) for line in open(path)]


def run(tmp_path, pair, contexts, name, **kw):
    teacher, student = pair
    cfg = ProbeConfig(teacher=teacher, student=student, contexts=str(contexts), out=str(tmp_path / name),
                      device="cpu", quiet=True, **kw)
    return read_tokens(run_probe(cfg, []) / "tokens.csv")


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_probe_equals_naive_reference(tmp_path, pair, contexts, loss, optimizer):
    df = run(tmp_path, pair, contexts, "r", loss=loss, optimizer=optimizer, lr=LR[optimizer], positions="6")
    teacher, student = load(pair[0]), load(pair[1])
    ctxs = {c["id"]: c for c in read_contexts(contexts)}
    for row in df.itertuples():
        ref = naive_probe(student, teacher, ctxs[row.context_id], row.position, VOCAB, loss, optimizer,
                          LR[optimizer])
        assert row.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)
        lr = LR[optimizer]  # lr·⟨g, d⟩: lr‖g‖², lr‖g‖₁ (adam's first step), lr‖g‖
        first = {"sgd": lr * ref["grad_norm"] ** 2, "adam": lr * ref["g_l1"], "normalized": lr * ref["grad_norm"]}
        assert row.gain_first_order == pytest.approx(first[optimizer], rel=1e-3)
        for col in ("fkl", "rkl", "fkl_after", "rkl_after"):
            assert getattr(row, col) == pytest.approx(ref[col], rel=1e-5, abs=1e-6), col
        for col in ("gain_fkl", "gain_rkl"):
            assert getattr(row, col) == pytest.approx(ref[col], rel=2e-3, abs=2e-6), col
        assert abs(row.gain_rkl) > 1e-4  # the step did something measurable


@pytest.mark.parametrize("params", ["lm_head", "last:1", "last:3"])
def test_param_subsets_with_tied_embeddings(tmp_path, llama_pair, contexts, params):
    df = run(tmp_path, llama_pair, contexts, "r", optimizer="sgd", lr=1e-3, params=params, positions="4")
    teacher, student = load(llama_pair[0]), load(llama_pair[1])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied: one shared matrix
    ctxs = {c["id"]: c for c in read_contexts(contexts)}
    for row in df.itertuples():
        ref = naive_probe(student, teacher, ctxs[row.context_id], row.position, VOCAB, "reverse_kl", "sgd", 1e-3,
                          params)
        assert row.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert row.gain_rkl == pytest.approx(ref["gain_rkl"], rel=2e-3, abs=2e-6)


def test_select_params_sets(llama_pair):
    model = load(llama_pair[1])
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for _, p in select_params(model, "all")) == n_all
    assert [n for n, _ in select_params(model, "lm_head")] == ["model.embed_tokens.weight"]  # tied
    last1 = [n for n, _ in select_params(model, "last:1")]
    assert all(n.startswith(("model.layers.2.", "model.norm", "model.embed_tokens")) for n in last1)
    for bad in ("last:0", "last:4", "last:x", "first"):
        with pytest.raises(InputError, match="--params"):
            select_params(model, bad)


def test_first_order_limit_sgd_reverse_kl(pair, contexts):
    """gain_rkl / (lr·‖g‖²) -> 1 as lr -> 0 (sgd, loss = reverse KL)."""
    teacher, student = load(pair[0]), load(pair[1])
    ctx = read_contexts(contexts)[1]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    t_ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"][:-1])
    t_logits = teacher(input_ids=t_ids[None]).logits[0, -len(ctx["response_ids"]):, :VOCAB].detach()
    errors = []
    for lr in (1e-2, 1e-3, 1e-4, 1e-5):
        probe = SingleStepProbe(student, "all", "reverse_kl", "sgd", lr, VOCAB)
        row = probe.run_context(ids, len(ctx["prompt_ids"]), t_logits[[2]], [2])[0]
        errors.append(abs(row["gain_rkl"] / (lr * row["grad_norm"] ** 2) - 1))
    assert errors[-1] < 1e-2
    assert errors[-1] < errors[0]


# lr small enough that the step is linear to ~1e-2, large enough that the first-order gain (5e-6 to 4e-4
# nats here, on every parameter set) stands well above the float32 rounding of the logits (~1e-7 nats).
# adam at 1e-8 is too small: its gain on lm_head, ~2e-7 nats, is at the noise floor (ratios 0.87..1.29).
SMALL_LR = {"sgd": 1e-5, "normalized": 1e-5, "adam": 1e-6}


@pytest.mark.parametrize("params", ["all", "lm_head", "last:1"])
@pytest.mark.parametrize("kind", ["SingleStepProbe", "make_probe"])
@pytest.mark.parametrize("optimizer", ["sgd", "normalized", "adam"])
def test_first_order_limit_of_the_tool(pair, contexts, optimizer, kind, params):
    """The tool's exact gain tends to its own first-order prediction, and that prediction equals
    lr·‖g‖² (sgd), lr·‖g‖ (normalized), lr·Σ g²/(|g|+1e-8) (adam) of an independent float64 gradient.

    make_probe picks BatchedProbe (all), HeadProbe (lm_head) and TopBlocksProbe (last:1) here."""
    from reference import reference_first_order, reference_gradient
    from teachdiag.probe.fast import make_probe

    teacher, student = load(pair[0]), load(pair[1])
    student.requires_grad_(False)
    ctx = read_contexts(contexts)[0]
    positions = [0, 1, 3]
    lr = SMALL_LR[optimizer]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    t_view = ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]
    with torch.no_grad():  # the teacher's logits from a plain full-sequence forward
        t_all = teacher(input_ids=torch.tensor([t_view + ctx["response_ids"]])).logits[0, :, :VOCAB]
    t_logits = t_all[[len(t_view) + j - 1 for j in positions]]
    cls = SingleStepProbe if kind == "SingleStepProbe" else make_probe
    rows = cls(student, params, "reverse_kl", optimizer, lr, VOCAB).run_context(ids, len(ctx["prompt_ids"]),
                                                                               t_logits, positions)
    for j, row in zip(positions, rows):
        grads = reference_gradient(student, teacher, ctx, j, VOCAB, "reverse_kl", params)
        # float32 gradient (tool) vs float64 gradient (reference): they agree to better than 1e-6 relative
        # on the tiny pair, every rule and parameter set; 1e-5 leaves a 10x margin for other BLAS builds
        assert row["gain_first_order"] == pytest.approx(lr * reference_first_order(grads, optimizer), rel=1e-5), j
        # second-order terms ~1e-3 relative at these lrs plus float32 noise of the gain: 2e-2 as before
        assert row["gain_rkl"] / row["gain_first_order"] == pytest.approx(1, abs=2e-2), j


def test_student_weights_bit_identical_after_probe(pair, contexts):
    student = load(pair[1])
    before = copy.deepcopy(student.state_dict())
    ctx = read_contexts(contexts)[3]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    t_logits = torch.randn(len(ctx["response_ids"]), VOCAB)
    for optimizer in ("sgd", "adam", "normalized"):
        probe = SingleStepProbe(student, "all", "reverse_kl", optimizer, 1e-2, VOCAB)
        rows = probe.run_context(ids, len(ctx["prompt_ids"]), t_logits, list(range(len(ctx["response_ids"]))))
        assert all(r["gain_rkl"] != 0 for r in rows)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in student.parameters())


def test_bfloat16_trap_is_refused_and_bf16_teacher_still_steps(tmp_path, pair, contexts):
    student = load(pair[1])
    w = student.lm_head.weight.detach().to(torch.bfloat16)
    stepped = w - 1e-5 * torch.randn_like(w)  # a small step applied to bf16 weights ...
    assert (stepped == w).float().mean() > 0.95  # ... mostly rounds to nothing
    with pytest.raises(ValueError, match="float32"):
        SingleStepProbe(student.to(torch.bfloat16), "all", "reverse_kl", "sgd", 1e-3, VOCAB)
    f32 = run(tmp_path, pair, contexts, "f32", positions="8")
    bf16 = run(tmp_path, pair, contexts, "bf16", positions="8", dtype="bfloat16")
    assert (bf16["gain_rkl"].abs() > 1e-4).all()
    assert bf16["gain_rkl"].corr(f32["gain_rkl"]) > 0.98


def test_nonfinite_logits_are_flagged(pair, contexts):
    student = load(pair[1])
    ctx = read_contexts(contexts)[0]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    t_logits = torch.randn(len(ctx["response_ids"]), VOCAB)
    t_logits[1, 5] = float("nan")
    rows = SingleStepProbe(student, "lm_head", "reverse_kl", "sgd", 1e-3, VOCAB).run_context(
        ids, len(ctx["prompt_ids"]), t_logits, [0, 1])
    assert rows[0]["finite"] == 1 and rows[1]["finite"] == 0
    assert math.isnan(rows[1]["fkl"])


def test_teacher_runs_once_per_context(tmp_path, pair, contexts, monkeypatch):
    import teachdiag.models as models

    calls = {"teacher": 0, "student": 0}
    real_load = models.load_model

    def counting_load(name, what, *args, **kw):
        model = real_load(name, what, *args, **kw)
        model.register_forward_pre_hook(lambda *_: calls.__setitem__(what, calls[what] + 1))
        return model

    monkeypatch.setattr(models, "load_model", counting_load)
    df = run(tmp_path, pair, contexts, "r")
    assert calls["teacher"] == df["context_id"].nunique() == 4
    # one forward + vmapped backward per context (BatchedProbe), then one forward after each step
    assert calls["student"] == df["context_id"].nunique() + len(df)


def test_the_step_holds_no_copy_of_the_whole_model(pair, contexts, stepped_peaks):
    """θ1 is taken module by module (steps.stepped): beside the weights and the gradient turned into
    d, the only copy of parameters is the running module's, never more than the largest module."""
    from teachdiag.probe import exact

    student = load(pair[1])
    peaks = stepped_peaks(exact)
    ctx = read_contexts(contexts)[1]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    probe = SingleStepProbe(student, "all", "reverse_kl", "adam", 1e-4, VOCAB)
    probe.run_context(ids, len(ctx["prompt_ids"]), torch.randn(2, VOCAB), [0, 2])
    largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in student.modules())
    assert len(peaks) == 2 and all(0 < peak <= largest for peak in peaks)
    held = [t for v in vars(probe).values() for t in (v if isinstance(v, list) else [v])
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
    assert sum(t.numel() for t in held) == 0  # the probe keeps no θ0 of its own between positions


def test_weights_restored_when_the_after_forward_fails(pair, contexts):
    student = load(pair[1])
    before = copy.deepcopy(student.state_dict())
    probe = SingleStepProbe(student, "all", "reverse_kl", "sgd", 1e-2, VOCAB)
    calls = {"n": 0}

    def fail_second(*_):
        calls["n"] += 1
        if calls["n"] == 2:  # the forward after the step
            raise RuntimeError("out of memory")

    student.register_forward_pre_hook(fail_second)
    ctx = read_contexts(contexts)[0]
    ids = torch.tensor(ctx["prompt_ids"] + ctx["response_ids"])
    with pytest.raises(RuntimeError, match="out of memory"):
        probe.run_context(ids, len(ctx["prompt_ids"]), torch.randn(1, VOCAB), [1])
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_left_padded_batch_equals_unpadded_forwards(arch):
    from conftest import make_model
    from teachdiag.probe.forward import pad_left

    model = make_model(arch, 128, 0).eval()
    prefixes = [torch.randint(0, 60, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 5, 1)]
    with torch.no_grad():
        batched = model(**pad_left(prefixes), logits_to_keep=1, use_cache=False).logits[:, -1]
        alone = torch.stack([model(input_ids=p[None], logits_to_keep=1, use_cache=False).logits[0, -1]
                             for p in prefixes])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
