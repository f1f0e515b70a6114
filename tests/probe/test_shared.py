"""The shared step and the checkpoint scorer against naive references built from torch alone.

The naive shared step does what DESIGN "Three instruments for the gain" says and nothing clever: deep-copy the student, forward
the FULL sequence of every context, take each position's loss through torch.distributions, mean
them, one torch.optim step (or the normalized step by hand), then re-score every position with
the copy. Its first-order reference is lr·⟨∇ℓ_t, Δθ/lr⟩ from per-position autograd gradients.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_contexts
from reference import full_logits, ref_signals, reference_loss
from teachdiag.commands.probe import ProbeConfig, run_probe
from teachdiag.table import read_tokens

VOCAB = 68
LR = {"sgd": 1e-2, "adam": 1e-4, "normalized": 1e-2}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def positions_of(ctxs):
    return [(i, j) for i, c in enumerate(ctxs) for j in range(len(c["response_ids"]))]


def naive_shared(student, teacher, ctxs, loss, optimizer, lr):
    """{(context, position): (fkl, fkl_after, rkl, rkl_after, first_order)} by deep copy + torch.optim."""
    model = copy.deepcopy(student)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    pos = positions_of(ctxs)

    def logits(m, c, j, who):
        ctx = ctxs[c]
        view = (ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]) if who == "t" else ctx["prompt_ids"]
        return full_logits(m, view + ctx["response_ids"], len(view) + j - 1, VOCAB).double()

    with torch.no_grad():
        t = {(c, j): logits(teacher, c, j, "t") for c, j in pos}
    per = {(c, j): reference_loss(logits(model, c, j, "s"), t[c, j], ctxs[c]["response_ids"][j], loss) for c, j in pos}
    mean = sum(per.values()) / len(pos)
    g = torch.autograd.grad(mean, params, retain_graph=True)
    g_t = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in per.items()}
    theta0 = [p.detach().clone() for p in params]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr), "adam": lambda: torch.optim.Adam(params, lr=lr)}
    if optimizer == "normalized":
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
        with torch.no_grad():
            for p, x in zip(params, g):
                p -= lr * x / norm
    else:
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt[optimizer]().step()
    delta = [(p.detach() - p0).double() for p, p0 in zip(params, theta0)]  # = −lr·scale·d
    out = {}
    for c, j in pos:
        first = -sum(float((x.double() * d).sum()) for x, d in zip(g_t[c, j], delta) if x is not None)
        with torch.no_grad():
            after = logits(model, c, j, "s")
        y = ctxs[c]["response_ids"][j]
        b = ref_signals(logits(student, c, j, "s").detach().numpy(), t[c, j].numpy(), y, 16)
        a = ref_signals(after.numpy(), t[c, j].numpy(), y, 16)
        out[c, j] = (b["fkl"], a["fkl"], b["rkl"], a["rkl"], first)
    return out


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_shared_step_equals_naive_reference(tmp_path, pair, loss, optimizer):
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / "r"),
                      device="cpu", quiet=True, gain="shared", loss=loss, optimizer=optimizer, lr=str(LR[optimizer]))
    df = read_tokens(run_probe(cfg, []) / "tokens.csv")
    ctxs = [json.loads(line) for line in open(contexts)]
    ref = naive_shared(load(pair[1]), load(pair[0]), ctxs, loss, optimizer, LR[optimizer])
    assert len(df) == len(ref) and set(df["instrument"]) == {"shared"}
    ids = {c["id"]: i for i, c in enumerate(ctxs)}
    for r in df.itertuples():
        fkl, fkl1, rkl, rkl1, first = ref[ids[r.context_id], r.position]
        assert r.fkl == pytest.approx(fkl, rel=1e-5, abs=1e-7)
        # gains are differences of two KLs: float32 forwards leave ~1e-6 absolute noise on this pair
        assert r.gain_fkl == pytest.approx(fkl - fkl1, rel=2e-3, abs=2e-6)
        assert r.gain_rkl == pytest.approx(rkl - rkl1, rel=2e-3, abs=2e-6)
        assert r.gain_first_order == pytest.approx(first, rel=2e-3, abs=1e-7)
        assert r.response_length == len(ctxs[ids[r.context_id]]["response_ids"])
    assert df["grad_norm"].nunique() == 1  # one ‖∇L‖ for the whole group


def test_shared_gain_tends_to_first_order_and_restores_theta0(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    ratios = []
    for lr in ("1e-2", "1e-4"):
        cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / lr),
                          device="cpu", quiet=True, gain="shared", lr=lr)
        df = read_tokens(run_probe(cfg, []) / "tokens.csv")
        big = df[df["gain_first_order"].abs() > df["gain_first_order"].abs().median()]
        ratios.append(float((big["gain_rkl"] / big["gain_first_order"] - 1).abs().median()))
    assert ratios[1] < ratios[0] and ratios[1] < 1e-2  # second-order terms shrink with lr

    from teachdiag.probe.shared import SharedStep
    from teachdiag.contexts import load_contexts

    student, teacher = load(pair[1]), load(pair[0])
    theta0 = copy.deepcopy(student.state_dict())
    ctxs = load_contexts(contexts)
    by_ctx = {i: list(range(len(c.response_ids))) for i, c in enumerate(ctxs)}
    SharedStep(student, "all", "reverse_kl", "adam", 1e-2, VOCAB).run(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
    assert all(torch.equal(theta0[k], v) for k, v in student.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in student.parameters())


def test_shared_batch_takes_one_step_per_group(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    base = dict(teacher=pair[0], student=pair[1], contexts=str(contexts), device="cpu", quiet=True, gain="shared")
    whole = read_tokens(run_probe(ProbeConfig(out=str(tmp_path / "a"), **base), []) / "tokens.csv")
    split = read_tokens(run_probe(ProbeConfig(out=str(tmp_path / "b"), shared_batch=2, **base), []) / "tokens.csv")
    assert whole["grad_norm"].nunique() == 1 and split["grad_norm"].nunique() == 2
    assert whole["fkl"].tolist() == pytest.approx(split["fkl"].tolist(), rel=1e-6)  # same θ0 signals
    ctxs = [json.loads(line) for line in open(contexts)]
    ref = naive_shared(load(pair[1]), load(pair[0]), ctxs[:2], "reverse_kl", "normalized", 1e-3)
    first = split[split["context_id"].isin(["c0", "c1"])]
    for r in first.itertuples():
        fkl, fkl1, *_ = ref[int(r.context_id[1]), r.position]
        assert r.gain_fkl == pytest.approx(fkl - fkl1, rel=2e-3, abs=2e-6)


def test_checkpoint_score_equals_two_naive_forwards(tmp_path, pair):
    """θτ = the student with its head perturbed, saved as a folder: gains are θ0 → θτ drops."""
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    after = load(pair[1])
    with torch.no_grad():
        after.lm_head.weight.add_(0.01 * torch.randn_like(after.lm_head.weight))
    after.save_pretrained(tmp_path / "after")
    cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / "r"),
                      device="cpu", quiet=True, student_after=str(tmp_path / "after"))
    df = read_tokens(run_probe(cfg, []) / "tokens.csv")
    student, teacher = load(pair[1]), load(pair[0])
    ctxs = [json.loads(line) for line in open(contexts)]
    assert set(df["instrument"]) == {"checkpoint"} and df["grad_norm"].isna().all() and (df["finite"] == 1).all()
    for r in df.itertuples():
        ctx = ctxs[int(r.context_id[1])]
        tv = ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]
        with torch.no_grad():
            t = full_logits(teacher, tv + ctx["response_ids"], len(tv) + r.position - 1, VOCAB)
            s0, s1 = (full_logits(m, ctx["prompt_ids"] + ctx["response_ids"], len(ctx["prompt_ids"]) + r.position - 1,
                                  VOCAB) for m in (student, after))
        y = ctx["response_ids"][r.position]
        b, a = ref_signals(s0.numpy(), t.numpy(), y, 16), ref_signals(s1.numpy(), t.numpy(), y, 16)
        assert r.fkl_after == pytest.approx(a["fkl"], rel=1e-5, abs=1e-7)
        assert r.gain_fkl == pytest.approx(b["fkl"] - a["fkl"], rel=1e-4, abs=1e-6)


def test_checkpoint_refuses_another_architecture(tmp_path, pair, llama_pair):
    from teachdiag.cli import main

    contexts = write_contexts(tmp_path / "c.jsonl", n=2)
    rc = main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--out",
               str(tmp_path / "r"), "--device", "cpu", "--quiet", "--student-after", llama_pair[1]])
    assert rc == 2 and not (tmp_path / "r" / "tokens.csv").exists()


def test_checkpoint_accepts_runtime_config_fields_of_a_trainer(tmp_path, pair):
    """TRL and verl save use_cache=False or a pad_token_id: the same architecture all the same."""
    contexts = write_contexts(tmp_path / "c.jsonl", n=2)
    after = load(pair[1])
    after.config.use_cache, after.config.pad_token_id = False, 5
    after.save_pretrained(tmp_path / "after")
    cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / "r"),
                      device="cpu", quiet=True, student_after=str(tmp_path / "after"))
    df = read_tokens(run_probe(cfg, []) / "tokens.csv")
    assert (df["gain_fkl"].abs() < 1e-6).all()  # same weights: no gain beyond float noise


def test_skip_first_order_leaves_the_measured_gains_unchanged(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    base = dict(teacher=pair[0], student=pair[1], contexts=str(contexts), device="cpu", quiet=True, gain="shared")
    full = read_tokens(run_probe(ProbeConfig(out=str(tmp_path / "a"), **base), []) / "tokens.csv")
    skip = read_tokens(run_probe(ProbeConfig(out=str(tmp_path / "b"), skip_first_order=True, **base), []) / "tokens.csv")
    assert skip["gain_first_order"].isna().all() and full["gain_first_order"].notna().all()
    assert skip["gain_fkl"].tolist() == full["gain_fkl"].tolist() and (skip["finite"] == 1).all()
