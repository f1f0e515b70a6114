"""branches.py: the verifier on planted answers, the teacher's alternatives, and forced continuations
against a hand-built `generate` call on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import N_WORDS, make_model
from teachdiag.branches import alternatives, continue_forced, final_answer, is_correct

EOS = N_WORDS  # the tiny models' end-of-sequence id


@pytest.mark.parametrize("text, want", [
    ("Step 1: 7 × 2 = 14\nStep 2: 14 + 14 = 28\nThe answer is 28.", "28"),
    ("Sam has 8 apples and buys 9 more, so Sam has 17 apples.", "17"),  # no 'answer is': last number
    ("The answer is 5. Then she buys 9 more.", "5"),                    # the stated answer wins
    ("the answer is: $1,200.", "1200"),
    ("The answer is -3.", "-3"),
    ("The answer is 7.0", "7"),
    ("So the answer is 12 apples; earlier I said the answer is 11.", "11"),  # the last statement
    ("no numbers here", None),
    ("", None),
])
def test_final_number_verifier(text, want):
    assert final_answer(text) == want


@pytest.mark.parametrize("text, want", [("so \\boxed{42}.", "42"), ("\\boxed{3} then \\boxed{1,000}", "1000"),
                                        ("The answer is 4.", None)])
def test_boxed_verifier(text, want):
    assert final_answer(text, "boxed") == want


def test_is_correct_compares_canonical_numbers():
    assert is_correct("The answer is 1,200.", "1200")
    assert is_correct("so 3 + 4 = 7", " 7 ")
    assert not is_correct("so 3 + 4 = 8", "7")
    assert not is_correct("nothing", "7")
    with pytest.raises(ValueError):
        final_answer("7", "vote")


def test_alternatives_are_the_teachers_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=g) * 3
    ids, probs = alternatives(logits, 4)
    ref = torch.softmax(logits.double(), -1)
    order = torch.argsort(ref, -1, descending=True)[:, :4]
    assert torch.equal(ids, order)
    assert torch.allclose(probs, ref.gather(-1, order), rtol=0, atol=1e-15)
    assert (probs[:, :-1] >= probs[:, 1:]).all()
    keep = torch.ones(30, dtype=torch.bool)
    keep[order[:, 0]] = False  # every row's best id is unreadable by the student: never offered
    ids_k, probs_k = alternatives(logits, 4, keep)
    assert not torch.isin(ids_k, order[:, 0]).any()
    assert torch.allclose(probs_k, ref.gather(-1, ids_k), rtol=0, atol=1e-15)  # full-softmax probabilities


def _hand_generate(model, prefix: list[int], n: int, vocab: int) -> list[int]:
    """One unpadded greedy generate call over the tokenizer's ids (< vocab), cut after the first EOS."""
    rows = model.get_output_embeddings().weight.shape[0]
    out = model.generate(input_ids=torch.tensor([prefix]), attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=EOS, pad_token_id=EOS,
                         suppress_tokens=list(range(vocab, rows)))[0, len(prefix):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def test_forced_continuation_equals_a_hand_built_generate_call():
    model = make_model("qwen2", 80, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(0, N_WORDS, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4)]
    got = continue_forced(model, prefixes, max_new_tokens=6, temperature=0.0, eos_ids=[EOS], pad_id=EOS,
                          seed=0, vocab=N_WORDS + 1, batch_size=3)  # two batches, left-padded
    for prefix, (ids, finish) in zip(prefixes, got):
        assert ids == _hand_generate(model, prefix, 6, N_WORDS + 1)
        assert finish == ("eos" if ids and ids[-1] == EOS else "length")
    # a forced end-of-sequence token ends the branch: nothing is generated after it
    assert continue_forced(model, [[1, 2, EOS]], max_new_tokens=6, temperature=0.0, eos_ids=[EOS], pad_id=EOS,
                           seed=0) == [([], "eos")]


def test_sampled_continuations_are_seeded():
    """Same seed, same continuations; another seed or greedy decoding gives others (a sampler that
    ignored the seed or the temperature would fail); padded rows are never sampled even when they
    are made the likeliest ids (without the suppression every token would be one)."""
    model = make_model("qwen2", 80, seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight[N_WORDS + 1:] += 50.0  # rows 68..79: beyond the tokenizer, now dominant
    prefixes = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    kw = dict(max_new_tokens=8, eos_ids=[EOS], pad_id=EOS, vocab=N_WORDS + 1)
    a = continue_forced(model, prefixes, seed=5, temperature=1.0, **kw)
    assert a == continue_forced(model, prefixes, seed=5, temperature=1.0, **kw)
    assert a != continue_forced(model, prefixes, seed=6, temperature=1.0, **kw)
    assert a != continue_forced(model, prefixes, seed=5, temperature=0.0, **kw)
    assert all(t <= N_WORDS for ids, _ in a for t in ids)  # padded rows beyond the tokenizer are never sampled
    assert sum(len(ids) for ids, _ in a) >= 8  # there were tokens to check
