"""The instrument interface (probe/instruments.py): every kind answers the same four calls, and
their grouping is what the runner relies on for resume and progress."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_contexts
from teachdiag.contexts import load_contexts
from teachdiag.probe.instruments import INSTRUMENTS, make_instrument

VOCAB = 68


@pytest.fixture(scope="module")
def models(pair):
    return tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in pair)


@pytest.mark.parametrize("kind", sorted(INSTRUMENTS))
def test_every_instrument_answers_the_same_calls(tmp_path, models, kind):
    teacher, student = models
    ctxs = load_contexts(write_contexts(tmp_path / "c.jsonl", n=4))
    by_ctx = {c: list(range(len(ctx.response_ids))) for c, ctx in enumerate(ctxs)}
    inst = make_instrument(kind, student=student, params="all", loss="reverse_kl", optimizer="normalized", lr=1e-3,
                           vocab=VOCAB, batch=5, shared_batch=2, cache_dir=str(tmp_path), after=student,
                           after_record={"path": "same"})
    todo = [1, 2, 3]  # context 0 done by an earlier run
    groups = inst.groups(by_ctx, todo)
    flat = [c for g in groups for c in g]
    assert flat == sorted(set(flat)) and set(todo) <= set(flat)
    assert set(flat) - set(todo) <= ({0} if kind == "shared" else set())  # only a shared step re-steps done ones
    seen = []
    for g in groups:
        rows = inst.run(teacher, ctxs, by_ctx, g, "cpu", lambda n, phase: seen.append(n))
        assert set(rows) == set(g) and all(len(rows[c]) == len(by_ctx[c]) for c in g)
    assert sum(seen) == inst.work(by_ctx, groups) > 0  # the progress bar ends full
    rec = inst.record()
    assert inst.name in ("per_position", "shared", "checkpoint") and "theta1" in rec and "probe" in rec


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown instrument"):
        make_instrument("two_step")
