"""The shared step at scale: no positions × vocabulary file, 8 bytes per parameter, rows per group
of contexts, a saved ∇L for --resume, and a full disk as one line.

`old_shared_rows` is the shared step as teachdiag computed it before (teacher logits and ∂ℓ/∂z kept
between the two passes, here in memory; one backward of Σℓ/n per context; the JVP's tangent a
scaled copy of d), written out from torch and teachdiag's building blocks, so the new code is
checked against the old numbers, not against numbers pasted in.
"""

import contextlib
import copy
import errno
import math
import os

import pandas as pd
import pytest
import torch
from torch.func import functional_call, jvp
from transformers import AutoModelForCausalLM

from conftest import write_contexts
from teachdiag.cli import main
from teachdiag.contexts import load_contexts
from teachdiag.probe import instruments, stepfile
from teachdiag.probe import shared as shared_module
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.instruments import make_instrument
from teachdiag.probe.rows import make_row
from teachdiag.probe.shared import SharedStep, eager_attention
from teachdiag.probe.signals import kls_from_logits, probe_loss, signals_from_logits
from teachdiag.probe.steps import apply_step, global_norm, rule
from teachdiag.table import read_tokens

VOCAB = 68
LR = {"sgd": 1e-2, "adam": 1e-4, "normalized": 1e-2}


@pytest.fixture(scope="module")
def models(pair):
    return tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in pair)


def old_shared_rows(student, teacher, ctxs, by_ctx, group, loss, optimizer, lr, keep=None):
    """{context: rows} by the previous algorithm (module docstring), θ0 restored."""
    model = student
    params = list(model.parameters())
    named = dict(model.named_parameters())
    theta0 = [p.detach().clone() for p in params]
    r = rule(optimizer)

    def view(ctx, positions):
        n = len(ctx.prompt_ids)
        return (torch.tensor(ctx.prompt_ids + ctx.response_ids[: max(positions)]),
                torch.tensor([n + j - 1 for j in positions]), torch.tensor([ctx.response_ids[j] for j in positions]))

    def usable(t, y):
        use = torch.isfinite(t).all(1)
        return use & keep[y] if loss == "sampled_token" and keep is not None else use

    t_all = {c: teacher_logits(teacher, ctxs[c], by_ctx[c], VOCAB, "cpu") for c in group}
    n_used = sum(int(usable(t_all[c], view(ctxs[c], by_ctx[c])[2]).sum()) for c in group)
    delta, before = {}, {}
    for p in params:
        p.requires_grad_(True)
    for c in group:
        ids, at, y = view(ctxs[c], by_ctx[c])
        t, use = t_all[c], usable(t_all[c], y)
        rows = slice(None) if use.all() else use
        z = model(input_ids=ids[None], logits_to_keep=at, use_cache=False).logits[0, :, :VOCAB].float()
        z.retain_grad()
        if use.any():
            (probe_loss(z[rows], t[rows], y[rows], loss, keep=keep) / n_used).backward()
        d = z.grad * n_used if z.grad is not None else torch.zeros_like(z)
        delta[c] = d.masked_fill(~use[:, None], float("nan"))
        z = z.detach()
        before[c] = ({k: v.tolist() for k, v in signals_from_logits(z, t, y, 16, keep).items()},
                     (torch.isfinite(z).all(1) & torch.isfinite(t).all(1)).tolist())
    for p in params:
        p.requires_grad_(False)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    norm = global_norm(grads)
    directions, scale = r.direction(grads, norm)
    tangents = {n: d * scale for n, d in zip(named, directions)}
    out = {}
    for c in group:
        ids, at, y = view(ctxs[c], by_ctx[c])

        def logits(stepped):
            return functional_call(model, stepped, (), {"input_ids": ids[None], "logits_to_keep": at,
                                                        "use_cache": False}).logits[0, :, :VOCAB].float()

        with eager_attention(model), torch.no_grad():
            _, dz = jvp(logits, ({n: p.detach() for n, p in named.items()},), (tangents,))
        first = (delta[c].double() * dz.double()).sum(-1).tolist()
        apply_step(params, directions, lr, scale)
        with torch.no_grad():
            z1 = model(input_ids=ids[None], logits_to_keep=at, use_cache=False).logits[0, :, :VOCAB].float()
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        after = kls_from_logits(z1, t_all[c], keep)
        sig, ok = before[c]
        ok1 = torch.isfinite(z1).all(1).tolist()
        out[c] = [make_row({k: v[i] for k, v in sig.items()}, after["fkl"][i].item(), after["rkl"][i].item(), norm,
                           lr * first[i], ok[i] and ok1[i]) for i in range(len(by_ctx[c]))]
    return out


def _contexts(tmp_path, n):
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=n))
    return ctxs, {i: list(range(len(c.response_ids))) for i, c in enumerate(ctxs)}


def _assert_same_rows(old, new, group):
    """Every column bit for bit but gain_first_order, which is float32 noise apart (its θ0 logits come
    from the JVP's eager forward, not pass 1's sdpa one, and its scale multiplies after the JVP)."""
    for c in group:
        for a, b in zip(old[c], new[c]):
            first_a, first_b = a.pop("gain_first_order"), b.pop("gain_first_order")
            assert a == b, c
            assert first_b == pytest.approx(first_a, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_token"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_rows_equal_the_previous_algorithm(models, tmp_path, one_thread, loss, optimizer):
    """Every column bit for bit but gain_first_order, whose θ0 logits now come from the JVP's eager
    forward (not pass 1's sdpa one) and whose scale multiplies after the JVP: float32 noise."""
    teacher, student = models
    ctxs, by_ctx = _contexts(tmp_path, 3)
    group = list(by_ctx)
    old = old_shared_rows(student, teacher, ctxs, by_ctx, group, loss, optimizer, LR[optimizer])
    new = SharedStep(student, "all", loss, optimizer, LR[optimizer], VOCAB).run(teacher, ctxs, by_ctx, group, "cpu")
    _assert_same_rows(old, new, group)


def test_a_bfloat16_teachers_logits_stay_bfloat16_and_give_the_same_rows(models, tmp_path, one_thread, monkeypatch):
    """The shared step keeps a bfloat16 teacher's logits in bfloat16 (half the bytes of each context's
    (P, V)); every float64 pass upcasts them exactly, so the rows are the float32 path's bit for bit."""
    teacher, student = models
    teacher16 = copy.deepcopy(teacher).to(torch.bfloat16)
    ctxs, by_ctx = _contexts(tmp_path, 3)
    group = list(by_ctx)
    old = old_shared_rows(student, teacher16, ctxs, by_ctx, group, "reverse_kl", "normalized", LR["normalized"])
    seen = []

    def spy(*args, **kw):
        t = teacher_logits(*args, **kw)
        seen.append(t.dtype)
        return t

    monkeypatch.setattr(shared_module, "teacher_logits", spy)
    new = SharedStep(student, "all", "reverse_kl", "normalized", LR["normalized"], VOCAB).run(
        teacher16, ctxs, by_ctx, group, "cpu")
    assert seen and set(seen) == {torch.bfloat16}
    _assert_same_rows(old, new, group)


def test_rows_left_out_of_the_loss_stay_within_float_noise(models, tmp_path, one_thread):
    """With a position left out, ∇L is now ∇(Σℓ/n_total) rescaled by n_total/n_used: an ulp here and
    there in θ1, which moves a KL after the step by ~1e-7 nats (the float32 floor of this pair's
    forwards; the naive reference test allows 2e-6)."""
    teacher, student = models
    ctxs, by_ctx = _contexts(tmp_path, 2)
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep[ctxs[0].response_ids[1]] = False
    old = old_shared_rows(student, teacher, ctxs, by_ctx, list(by_ctx), "sampled_token", "sgd", 1e-2, keep)
    step = SharedStep(student, "all", "sampled_token", "sgd", 1e-2, VOCAB, keep=keep)
    new = step.run(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
    assert step.n_skipped >= 1
    for c in by_ctx:
        for a, b in zip(old[c], new[c]):
            assert a["finite"] == b["finite"]
            for k in ("gain_fkl", "gain_rkl", "gain_first_order", "grad_norm"):
                if math.isfinite(a[k]):
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=5e-7), k


def test_eight_bytes_per_parameter(models, tmp_path, monkeypatch, stepped_peaks):
    """The step is applied from ∇L's own memory (d in place), the JVP's tangent is that memory too,
    and θ1 is taken module by module: beside the weights and d, nothing of the parameters' size is
    made but the copy of the modules whose θ1 forward is running (never more than the largest)."""
    teacher, student = models
    ctxs, by_ctx = _contexts(tmp_path, 2)
    step = SharedStep(student, "all", "reverse_kl", "adam", 1e-4, VOCAB)
    step.gradient(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
    grad_ptrs = [g.data_ptr() for g in step.grads]
    seen, real_jvp = [], shared_module.jvp

    def spy(f, primals, tangents):
        seen.append([t.data_ptr() for t in tangents[0].values()])
        return real_jvp(f, primals, tangents)

    monkeypatch.setattr(shared_module, "jvp", spy)
    peaks = stepped_peaks(shared_module)
    theta0 = copy.deepcopy(student.state_dict())
    step.rescore(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
    assert [d.data_ptr() for d in step.directions] == grad_ptrs and step.grads is None
    assert seen and all(s == grad_ptrs for s in seen)
    largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in student.modules())
    assert len(peaks) == len(by_ctx) and all(0 < peak <= largest for peak in peaks)
    assert all(torch.equal(theta0[k], v) for k, v in student.state_dict().items())
    step.release()
    assert step.directions is None


def test_the_gradient_pass_keeps_only_the_layers_inputs(models, tmp_path, monkeypatch, one_thread):
    """The gradient pass recomputes the decoder layers in its backward (probe/recompute.py): less is
    saved for the backward than by the plain forward, and ∇L is the same bit for bit."""
    teacher, student = models
    ctxs, by_ctx = _contexts(tmp_path, 2)

    def gradient():
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        step = SharedStep(student, "all", "reverse_kl", "normalized", 1e-2, VOCAB)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step.gradient(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
        return step.grads, sum(kept)

    recomputed, kept_recomputed = gradient()
    monkeypatch.setattr(shared_module, "recomputed_layers", lambda model: contextlib.nullcontext())
    plain, kept_plain = gradient()
    assert all(torch.equal(a, b) for a, b in zip(recomputed, plain))
    assert kept_recomputed < 0.5 * kept_plain


def _instrument(student, tmp_path, resume=False, **kw):
    args = dict(student=student, params="all", loss="reverse_kl", optimizer="normalized", lr=1e-2, vocab=VOCAB,
                cache_dir=str(tmp_path), resume=resume)
    return make_instrument("shared", **(args | kw))


def test_a_whole_run_step_is_saved_and_resumed(models, tmp_path, monkeypatch):
    """Rows per context (ROW_GROUP = 1), the step saved after pass 1; a new instrument told to
    resume with two contexts done loads it (pass 1 is not run again) and gives the same rows."""
    teacher, student = models
    monkeypatch.setattr(instruments, "ROW_GROUP", 1)
    ctxs, by_ctx = _contexts(tmp_path, 4)
    whole = SharedStep(student, "all", "reverse_kl", "normalized", 1e-2, VOCAB).run(teacher, ctxs, by_ctx,
                                                                                   list(by_ctx), "cpu")
    inst = _instrument(student, tmp_path)
    groups = inst.groups(by_ctx, list(by_ctx))
    assert groups == [[0], [1], [2], [3]]
    path = tmp_path / "shared_step.0.safetensors"
    first = inst.run(teacher, ctxs, by_ctx, groups[0], "cpu", lambda n, p: None)
    assert path.is_file() and first[0] == whole[0]
    from safetensors.torch import load_file  # the file is plain safetensors

    saved = load_file(path)
    for (name, _), d in zip(inst.step.named, inst.step.directions):  # normalized: d is ∇L itself
        assert torch.equal(saved[f"grad.{name}"], d), name
    assert saved["before.fkl"].shape == (sum(len(p) for p in by_ctx.values()),)

    # "crash" after context 1; a resumed run sees contexts 0 and 1 done
    inst.run(teacher, ctxs, by_ctx, groups[1], "cpu", lambda n, p: None)
    again = _instrument(student, tmp_path, resume=True)
    monkeypatch.setattr(again.step, "gradient", lambda *a, **k: pytest.fail("pass 1 ran again"))
    seen = []
    left = again.groups(by_ctx, [2, 3])
    assert left == [[2], [3]] and path.is_file()
    rows = {}
    for g in left:
        rows |= again.run(teacher, ctxs, by_ctx, g, "cpu", lambda n, p: seen.append(n))
    assert rows == {2: whole[2], 3: whole[3]}
    assert sum(seen) == again.work(by_ctx, left) == len(by_ctx[2]) + len(by_ctx[3])  # no pass 1 in the bar
    assert not path.exists()  # gone with the step's last rows


def test_a_saved_step_is_not_used_without_resume_or_for_other_work(models, tmp_path, monkeypatch):
    teacher, student = models
    monkeypatch.setattr(instruments, "ROW_GROUP", 1)
    ctxs, by_ctx = _contexts(tmp_path, 3)
    inst = _instrument(student, tmp_path)
    inst.run(teacher, ctxs, by_ctx, inst.groups(by_ctx, list(by_ctx))[0], "cpu", lambda n, p: None)
    path = tmp_path / "shared_step.0.safetensors"
    assert path.is_file()
    other = _instrument(student, tmp_path, resume=True, loss="forward_kl")  # another loss: another step
    assert not other.step.matches(path, list(by_ctx), by_ctx)
    fresh = _instrument(student, tmp_path)  # --overwrite: an earlier run's step is removed
    fresh.groups(by_ctx, list(by_ctx))
    assert not path.exists()
    path.write_bytes(b"not a step")  # a torn or foreign file is computed again, never trusted
    assert not inst.step.matches(path, list(by_ctx), by_ctx)


def test_small_steps_are_not_saved(models, tmp_path):
    """--shared-batch 2 at the default ROW_GROUP: each step's rows are one group, nothing to save."""
    teacher, student = models
    ctxs, by_ctx = _contexts(tmp_path, 4)
    inst = _instrument(student, tmp_path, shared_batch=2)
    groups = inst.groups(by_ctx, [1, 2, 3])
    assert groups == [[1], [2, 3]]  # context 0 is done, but is still in its step's loss
    for g in groups:
        inst.run(teacher, ctxs, by_ctx, g, "cpu", lambda n, p: None)
        assert not list(tmp_path.glob("shared_step.*"))


def _probe(pair, contexts, out, *extra):
    return ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--gain", "shared", "--lr", "1e-2", "--out", str(out), *extra]


@pytest.mark.parametrize("fault", ["rows", "step"])
def test_a_full_disk_is_one_line_and_resume_finishes(tmp_path, pair, monkeypatch, capsys, fault):
    """ENOSPC while writing the second context's rows (the step is saved by then: the resume does
    not take pass 1 again), or while saving the step itself (half written; the resume takes it
    again): one line, exit 2, and --resume gives the uninterrupted table."""
    import teachdiag.runfolder as runfolder

    monkeypatch.setattr(instruments, "ROW_GROUP", 1)
    contexts = write_contexts(tmp_path / "c.jsonl", n=4)
    assert main(_probe(pair, contexts, tmp_path / "full")) == 0
    out = tmp_path / "r"

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if fault == "rows":
        calls, real = [0], runfolder._fsync_write

        def failing(path, text, mode="a"):
            calls[0] += 1
            if path.name.startswith("tokens.partial") and calls[0] > 3:  # the second context's rows
                real(path, text[: len(text) // 2], mode)
                full(path)
            return real(path, text, mode)

        monkeypatch.setattr(runfolder, "_fsync_write", failing)
    else:
        real_save = stepfile.os.fsync

        def failing_fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors.tmp"):
                full("shared_step.0.safetensors.tmp")
            return real_save(fd)

        monkeypatch.setattr(stepfile.os, "fsync", failing_fsync)
    capsys.readouterr()
    assert main(_probe(pair, contexts, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and os.strerror(errno.ENOSPC) in err, err
    assert "--resume" in err and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    monkeypatch.setattr(instruments, "ROW_GROUP", 1)
    if fault == "rows":
        assert (out / "shared_step.0.safetensors").is_file()
        from teachdiag.probe.shared import SharedStep as Step

        monkeypatch.setattr(Step, "gradient", lambda *a, **k: pytest.fail("pass 1 ran again"))
    assert main(_probe(pair, contexts, out, "--resume")) == 0
    pd.testing.assert_frame_equal(read_tokens(out / "tokens.csv"), read_tokens(tmp_path / "full/tokens.csv"))
    assert not list(out.glob("shared_step.*"))


def test_not_enough_space_for_the_step_is_refused_before_any_work(tmp_path, pair, monkeypatch, capsys):
    from collections import namedtuple

    monkeypatch.setattr(instruments, "ROW_GROUP", 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stepfile.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    contexts = write_contexts(tmp_path / "c.jsonl", n=2)
    capsys.readouterr()
    assert main(_probe(pair, contexts, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GB free for the shared step's gradient" in err, err
    assert not (tmp_path / "r" / "tokens.partial.csv").exists()
