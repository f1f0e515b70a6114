"""Pairs whose tokenizers differ in added/special ids: everything over the shared ids, renormalised.

References are independent of the code under test: ref_signals (NumPy, float64) cuts both
distributions to the kept ids and renormalises; the losses are written out through
torch.distributions on the index-selected logits; the dropped masses are computed by hand.
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_contexts
from reference import ref_signals, reference_loss
from teachdiag.contexts import load_contexts
from teachdiag.probe import shared as shared_module
from teachdiag.probe.exact import SingleStepProbe
from teachdiag.probe.fast import make_probe
from teachdiag.probe.shared import SharedStep
from teachdiag.probe.signals import (LOSSES, SIGNALS, keep_mask, kls_from_logits, probe_loss,
                                     signals_from_logits)

VOCAB = 68  # the conftest pair's tokenizer


def random_case(seed, P=7, V=300):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(P, V, generator=g) * 3, torch.randn(P, V, generator=g) * 3
    keep = torch.rand(V, generator=g) > 0.2
    kept = torch.nonzero(keep).squeeze(1)
    y = kept[torch.randint(0, len(kept), (P,), generator=g)]
    y[0] = int(torch.nonzero(~keep)[0])  # one sampled token outside the shared ids
    return s, t, y, keep


@pytest.mark.parametrize("k", [1, 16])
def test_signals_with_keep_match_the_renormalised_reference(k):
    s, t, y, keep = random_case(k)
    got = signals_from_logits(s, t, y, k, keep=keep)
    assert set(got) == set(SIGNALS)
    for i in range(len(y)):
        ref = ref_signals(s[i].numpy(), t[i].numpy(), int(y[i]), k, keep=keep.numpy())
        for name in SIGNALS:
            if name == "topk_entropy" and k == 1:
                assert got[name][i].item() == 0.0
                continue
            if math.isnan(ref[name]):
                assert math.isnan(got[name][i].item()), name
                continue
            assert got[name][i].item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), (name, i)
    assert math.isnan(got["student_logprob"][0]) and math.isnan(got["teacher_logprob"][0])  # y_0 outside keep
    kls = kls_from_logits(s, t, keep)
    assert torch.equal(kls["fkl"], got["fkl"]) and torch.equal(kls["rkl"], got["rkl"])


def test_dropped_masses_and_fkl_by_hand():
    # p_S uniform over 4 ids; p_T ∝ (1, 1, 1, 5); id 2 dropped
    s = torch.zeros(1, 4, dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 0.0, math.log(5)]], dtype=torch.float64)
    keep = torch.tensor([True, True, False, True])
    got = signals_from_logits(s, t, torch.tensor([3]), 2, keep=keep)
    assert got["student_dropped_mass"].item() == pytest.approx(1 / 4, rel=1e-15)
    assert got["teacher_dropped_mass"].item() == pytest.approx(1 / 8, rel=1e-15)
    pt, ps = [1 / 7, 1 / 7, 5 / 7], [1 / 3] * 3  # renormalised over ids 0, 1, 3
    assert got["fkl"].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pt, ps)), rel=1e-14)
    assert got["teacher_logprob"].item() == pytest.approx(math.log(5 / 7), rel=1e-14)
    assert got["student_logprob"].item() == pytest.approx(math.log(1 / 3), rel=1e-14)


def test_no_keep_gives_zero_dropped_mass_and_all_true_keep_the_same_numbers():
    s, t, y, _ = random_case(3)
    plain = signals_from_logits(s, t, y, 16)
    full = signals_from_logits(s, t, y, 16, keep=torch.ones(s.shape[1], dtype=torch.bool))
    assert (plain["student_dropped_mass"] == 0).all() and (plain["teacher_dropped_mass"] == 0).all()
    for name in SIGNALS:
        torch.testing.assert_close(full[name], plain[name], rtol=1e-13, atol=1e-15)
    assert keep_mask(None, 10) is None
    assert keep_mask([0, 2], 4).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="keep has shape"):
        signals_from_logits(s, t, y, 16, keep=torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("loss", LOSSES)
def test_probe_loss_gradient_with_keep_equals_autograd_on_the_compact_logits(loss):
    s, t, y, keep = random_case(7)
    y[0] = int(torch.nonzero(keep)[0])  # every y inside keep: the loss is defined everywhere
    ids = torch.nonzero(keep).squeeze(1)
    column = {int(v): i for i, v in enumerate(ids)}

    z = s.double().requires_grad_(True)
    (g_got,) = torch.autograd.grad(probe_loss(z, t, y, loss, keep=keep), z)

    z_ref = s.double().requires_grad_(True)
    zc, tc = z_ref[:, ids], t.double()[:, ids]  # the compact logits, by plain indexing
    ref = sum(reference_loss(zc[i], tc[i], column[int(y[i])], loss) for i in range(len(y)))
    (g_ref,) = torch.autograd.grad(ref, z_ref)

    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)
    assert (g_got[:, ~keep] == 0).all()  # a dropped id's logit does not move


def test_sampled_token_outside_keep_is_nan_and_does_not_poison_other_rows():
    s, t, y, keep = random_case(11)  # y_0 is outside keep
    z = s.double().requires_grad_(True)
    per = probe_loss(z, t, y, "sampled_token", reduce=False, keep=keep)
    assert math.isnan(per[0].item()) and torch.isfinite(per[1:]).all()
    (g,) = torch.autograd.grad(per[1:].sum(), z)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------- with models

def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(pair):
    return load(pair[0]), load(pair[1])


def test_exact_probe_marks_a_sampled_token_outside_keep_not_finite(models, tmp_path):
    teacher, student = models
    ctx = load_contexts(write_contexts(tmp_path / "c.jsonl", n=1, teacher_view=False))[0]
    j = 2
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep[ctx.response_ids[j]] = False
    keep[VOCAB - 1] = False  # and one id nobody samples
    from teachdiag.probe.forward import teacher_logits

    positions = list(range(len(ctx.response_ids)))
    t = teacher_logits(teacher, ctx, positions, VOCAB, "cpu")
    ids = torch.tensor(ctx.prompt_ids + ctx.response_ids)
    for probe in (SingleStepProbe(student, "all", "sampled_token", "normalized", 1e-3, VOCAB, keep=keep),
                  make_probe(student, "all", "reverse_kl", "normalized", 1e-3, VOCAB, keep=keep)):
        rows = probe.run_context(ids, len(ctx.prompt_ids), t, positions)
        bad = [i for i, j_ in enumerate(positions) if ctx.response_ids[j_] == ctx.response_ids[j]]
        for i, row in enumerate(rows):
            assert row["finite"] == (0 if i in bad else 1), (type(probe).__name__, i)
            assert math.isnan(row["student_logprob"]) == (i in bad)
            assert row["teacher_dropped_mass"] > 0 and row["student_dropped_mass"] > 0
            if i not in bad:
                z = student(input_ids=ids[None, : len(ctx.prompt_ids) + positions[i]]).logits[0, -1, :VOCAB]
                ref = ref_signals(z.detach().numpy(), t[i].numpy(), ctx.response_ids[positions[i]], 16, keep.numpy())
                assert row["fkl"] == pytest.approx(ref["fkl"], rel=1e-5)
                assert row["teacher_dropped_mass"] == pytest.approx(ref["teacher_dropped_mass"], rel=1e-5)


def _shared_rows(student, teacher, ctxs, by_ctx, loss, keep):
    step = SharedStep(student, "all", loss, "normalized", 1e-2, VOCAB, keep=keep)
    rows = step.run(teacher, ctxs, by_ctx, list(by_ctx), "cpu")
    return rows, step


COMPARED = ("fkl", "rkl", "fkl_after", "rkl_after", "grad_norm", "gain_first_order", "teacher_dropped_mass")


def _same_rows(rows_a, rows_b, by_a, by_b):
    for c in by_b:
        for j, row in zip(by_b[c], rows_b[c]):
            other = rows_a[c][by_a[c].index(j)]
            assert other["finite"] == row["finite"] == 1
            for name in COMPARED:
                assert other[name] == pytest.approx(row[name], rel=1e-5, abs=1e-9), (c, j, name)


def test_shared_step_leaves_a_sampled_token_outside_keep_out_of_the_gradient(models, tmp_path):
    teacher, student = models
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=2))
    c, j = 0, 1
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep[ctxs[c].response_ids[j]] = False
    by_all = {i: [p for p in range(len(x.response_ids))] for i, x in enumerate(ctxs)}
    # the positions whose token is the dropped one: excluded by hand in the comparison run
    out = {(i, p) for i, x in enumerate(ctxs) for p in by_all[i] if x.response_ids[p] == ctxs[c].response_ids[j]}
    by_without = {i: [p for p in ps if (i, p) not in out] for i, ps in by_all.items()}

    rows_all, step = _shared_rows(student, teacher, ctxs, by_all, "sampled_token", keep)
    assert step.n_skipped == len(out)
    assert math.isfinite(step.grad_norm)
    for i, p in out:
        assert rows_all[i][by_all[i].index(p)]["finite"] == 0
    rows_without, step_b = _shared_rows(student, teacher, ctxs, by_without, "sampled_token", keep)
    assert step_b.n_skipped == 0
    _same_rows(rows_all, rows_without, by_all, by_without)


def test_shared_step_skips_non_finite_teacher_rows(models, tmp_path, monkeypatch):
    teacher, student = models
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=2))
    by_all = {i: list(range(len(x.response_ids))) for i, x in enumerate(ctxs)}
    bad = (1, 2)
    by_without = {i: [p for p in ps if (i, p) != bad] for i, ps in by_all.items()}
    real = shared_module.teacher_logits

    def poisoned(teacher_, ctx, positions, vocab, device, **kw):
        t = real(teacher_, ctx, positions, vocab, device, **kw)
        if ctx.id == ctxs[bad[0]].id and bad[1] in positions:
            t[positions.index(bad[1]), 5] = float("nan")
        return t

    monkeypatch.setattr(shared_module, "teacher_logits", poisoned)
    for keep in (None, keep_mask(list(range(VOCAB - 3)), VOCAB)):
        rows_all, step = _shared_rows(student, teacher, ctxs, by_all, "reverse_kl", keep)
        assert step.n_skipped == 1 and math.isfinite(step.grad_norm)
        assert rows_all[bad[0]][bad[1]]["finite"] == 0
        rows_without, _ = _shared_rows(student, teacher, ctxs, by_without, "reverse_kl", keep)
        _same_rows(rows_all, rows_without, by_all, by_without)


@pytest.mark.parametrize("params,optimizer", [("lm_head", "adam"), ("lm_head", "normalized"), ("last:1", "sgd"),
                                              ("all", "normalized")])
def test_every_per_position_instrument_agrees_with_the_plain_probe_under_keep(models, tmp_path, params, optimizer):
    """HeadProbe (closed form over δ, zero on dropped ids), TopBlocksProbe, BatchedProbe and linear
    mode against SingleStepProbe, all with the same keep; the checkpoint scorer's signals too."""
    from teachdiag.probe.checkpoint import CheckpointScore
    from teachdiag.probe.forward import teacher_logits
    from teachdiag.probe.linear import first_order_rows

    teacher, student = models
    ctx = load_contexts(write_contexts(tmp_path / "c.jsonl", n=1, teacher_view=False))[0]
    keep = keep_mask([i for i in range(VOCAB) if i % 5], VOCAB)
    positions = [p for p in range(len(ctx.response_ids)) if keep[ctx.response_ids[p]]]
    assert len(positions) >= 2
    t = teacher_logits(teacher, ctx, positions, VOCAB, "cpu")
    ids = torch.tensor(ctx.prompt_ids + ctx.response_ids)
    lr = {"adam": 1e-4, "normalized": 1e-2, "sgd": 1e-3}[optimizer]
    args = (student, params, "reverse_kl", optimizer, lr, VOCAB)
    plain = SingleStepProbe(*args, keep=keep).run_context(ids, len(ctx.prompt_ids), t, positions)
    fast = make_probe(*args, keep=keep)
    assert type(fast).__name__ == {"lm_head": "HeadProbe", "last:1": "TopBlocksProbe", "all": "BatchedProbe"}[params]
    got = fast.run_context(ids, len(ctx.prompt_ids), t, positions)
    prefixes = [ids[: len(ctx.prompt_ids) + p] for p in positions]
    linear = first_order_rows(*args[:2], prefixes, t, [ctx.response_ids[p] for p in positions], "reverse_kl",
                              optimizer, lr, VOCAB, keep=keep)
    ckpt = CheckpointScore(student, student, VOCAB, keep=keep).run_context(ids, len(ctx.prompt_ids), t, positions)
    for a, b, c, d in zip(plain, got, linear, ckpt):
        assert a["finite"] == b["finite"] == c["finite"] == d["finite"] == 1
        for name in ("fkl", "rkl", "student_logprob", "student_dropped_mass", "teacher_dropped_mass"):
            for other in (b, c, d):
                assert other[name] == pytest.approx(a[name], rel=1e-5), name
        for name in ("fkl_after", "rkl_after", "grad_norm", "gain_first_order"):
            assert b[name] == pytest.approx(a[name], rel=1e-4), name
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert c["gain_first_order"] == pytest.approx(a["gain_first_order"], rel=1e-4)
        assert abs(a["gain_rkl"]) > 1e-6
