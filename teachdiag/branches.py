"""Branch viability's parts (arXiv 2605.21606): the verifier, the teacher's alternatives, forced continuations.

    from teachdiag.branches import final_answer, is_correct, alternatives, continue_forced
    final_answer("so Sam has 9 apples.")              # "9": the number after the last "answer is", else the last number
    ids, probs = alternatives(teacher_logits, k=4)    # (P, k) the privileged teacher's top-k next tokens
    outs = continue_forced(student, [prefix + [alt], ...], max_new_tokens=96, temperature=0.0, ...)

A branch at position j of a frozen student rollout is the student's own view (prompt_ids +
response_ids[:j]) with one of the teacher's alternatives forced as token j; the student then
continues on its own (greedy, or sampled at a temperature) for at most max_new_tokens, and the
branch is viable when the response text it ends up with (spine prefix + alternative +
continuation) states the record's answer. `commands/viability.py` runs this over a file of contexts.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation

import torch

from teachdiag.generation import generate_batch

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_STATED = re.compile(r"answer is[^\d\-]{0,12}(" + _NUMBER + ")", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY = re.compile(_NUMBER)
VERIFIERS = ("final_number", "boxed")


def _canon(number: str) -> str:
    """'1,200' -> '1200', '7.0' -> '7', '-3' stays: the form answers are compared in. Exact decimal
    arithmetic, so a 20-digit number is not rounded into its neighbour and 400 digits do not overflow."""
    s = number.replace(",", "").strip()
    try:
        x = Decimal(s)
    except InvalidOperation:
        return s
    if not x.is_finite():
        return s
    if x == 0:
        return "0"
    if x == x.to_integral_value():
        return str(x.quantize(Decimal(1), context=Context(prec=len(s) + 2)))
    return format(x.normalize(), "f")


def final_answer(text: str, verifier: str = "final_number") -> str | None:
    """The answer a response states, or None.

    final_number: the number after the last "answer is" (the demo's "The answer is N."), else the
    last number anywhere in the text (GSM8K-style). boxed: the content of the last \\boxed{...}.
    """
    if verifier == "boxed":
        boxes = _BOXED.findall(text)
        return _canon(boxes[-1]) if boxes else None
    if verifier != "final_number":
        raise ValueError(f"unknown verifier {verifier!r}; one of {VERIFIERS}")
    stated = _STATED.findall(text)
    if stated:
        return _canon(stated[-1])
    numbers = _ANY.findall(text)
    return _canon(numbers[-1]) if numbers else None


def is_correct(text: str, answer: str, verifier: str = "final_number") -> bool:
    """Whether `text` states `answer` (both in the canonical number form)."""
    return answer_matches(final_answer(text, verifier), answer)


def answer_matches(got: str | None, answer: str) -> bool:
    """Whether an answer read by final_answer (None: none found) is the record's `answer`."""
    return got is not None and got == _canon(str(answer))


def alternatives(teacher_logits: torch.Tensor, k: int, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, k) ids and (P, k) float64 probabilities of the teacher's k most likely next tokens.

    teacher_logits: (P, V). keep: None or bool (V,), the ids both tokenizers read alike; the
    student can only continue after an id it reads as the teacher does, so others are never
    alternatives (their probability is taken before that restriction, from the full softmax)."""
    probs = torch.softmax(teacher_logits.double(), -1)  # (P, V), float64: ranks of near-ties are stable
    ranked = probs if keep is None else probs.masked_fill(~keep, -1.0)
    top = torch.topk(ranked, k, dim=-1)  # sorted, most likely first
    return top.indices, probs.gather(-1, top.indices)


def continue_forced(student, prefixes: list[list[int]], *, max_new_tokens: int, temperature: float,
                    eos_ids: list[int], pad_id: int, seed: int, vocab: int | None = None,
                    batch_size: int = 16) -> list[tuple[list[int], str]]:
    """The student's continuation of each prefix (its view with the forced token last): [(ids, finish)].

    A prefix that already ends with an end-of-sequence token is finished: ([], "eos"). Greedy at
    temperature 0, else sampled from the full distribution at `temperature` (no top-p), seeded
    per batch as `teachdiag rollout` does. Prefixes are batched in order, left-padded.
    """
    out: list[tuple[list[int], str] | None] = [([], "eos") if p[-1] in eos_ids else None for p in prefixes]
    todo = [i for i, o in enumerate(out) if o is None]
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        got = generate_batch(student, [prefixes[i] for i in idx], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=1.0, eos_ids=eos_ids, pad_id=pad_id,
                             seed=seed + b, vocab=vocab)
        for i, g in zip(idx, got):
            out[i] = g
    return out  # type: ignore[return-value]
