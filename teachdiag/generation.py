"""Prompt records and sampling: the library behind `teachdiag rollout`, `train --on-policy` and
`teachdiag viability`'s continuations (commands import it; it imports no command).

    from teachdiag.generation import read_prompts, stop_ids, generate_batch
    records = read_prompts("prompts.jsonl")                       # [{id, student, teacher, answer, line}]
    eos, pad = stop_ids(model, tok)
    generate_batch(model, [ids_a, ids_b], max_new_tokens=192, temperature=1.0, top_p=1.0,
                   eos_ids=eos, pad_id=pad, seed=0)               # [(response_ids, "eos" | "length")]
"""

from __future__ import annotations

from pathlib import Path

import torch

from teachdiag.contexts import check_messages, check_unicode, read_jsonl
from teachdiag.errors import InputError


def _check_text_or_messages(rec: dict, text_key: str, msgs_key: str, file: str, line: int,
                            required: bool):
    has_text, has_msgs = text_key in rec, msgs_key in rec
    if has_text and has_msgs:
        raise InputError(f"give either {text_key} or {msgs_key}, not both", file, line, msgs_key)
    if not has_text and not has_msgs:
        if required:
            raise InputError(f"missing {text_key} (or {msgs_key})", file, line, text_key)
        return None
    if has_text:
        value = rec[text_key]
        if not isinstance(value, str) or not value:
            raise InputError("must be a non-empty string", file, line, text_key)
        check_unicode(value, text_key, {"file": file, "line": line})
        return value
    return check_messages(rec[msgs_key], msgs_key, {"file": file, "line": line})


def read_prompts(path: str | Path, need_teacher: bool = False) -> list[dict]:
    """Validated prompt records: [{id, student, teacher (or None), answer (or None), line}].

    `student` / `teacher` are a string (plain prompt) or a message list.
    """
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise InputError("prompt file not found", file, field="--prompts")
    out, seen = [], {}
    for line_no, rec in read_jsonl(p):
        rid = rec.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise InputError("missing or not a string", file, line_no, "id")
        rid = str(rid)
        check_unicode(rid, "id", {"file": file, "line": line_no})
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} (first on line {seen[rid]})", file, line_no,
                             "id")
        seen[rid] = line_no
        student = _check_text_or_messages(rec, "prompt", "messages", file, line_no, True)
        teacher = _check_text_or_messages(rec, "teacher_prompt", "teacher_messages", file,
                                          line_no, need_teacher)
        out.append({"id": rid, "student": student, "teacher": teacher,
                    "answer": rec.get("answer"), "line": line_no})
    if not out:
        raise InputError("no prompt records", file, field="--prompts")
    return out


# ---------------------------------------------------------------------------------------------
# sampling


def stop_ids(model, tok) -> tuple[list[int], int]:
    """(end-of-sequence ids, padding id) for sampling: the generation config's and the tokenizer's EOS,
    and the tokenizer's pad token (else the first EOS)."""
    eos = _eos_ids(model, tok)
    return eos, tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)


def _eos_ids(model, tok) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   top_p: float, eos_ids: list[int], pad_id: int, seed: int, vocab: int | None = None
                   ) -> list[tuple[list[int], str]]:
    """Sample one response per prompt (left-padded batch); returns [(response_ids, finish)].

    vocab: the tokenizer's length; ids at or above it (padded embedding rows, e.g. 151,665 tokens
    against 151,936 rows in Qwen2.5) are never sampled, since no tokenizer can read them back.

    A response stops at (and keeps) the first EOS token: finish "eos"; otherwise it has
    `max_new_tokens` tokens: finish "length".
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
        eos_token_id=eos_ids or None, pad_token_id=pad_id,
        suppress_tokens=list(range(vocab, model.get_output_embeddings().weight.shape[0])) if vocab else None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=gen_cfg)
    results = []
    for row in out[:, width:].tolist():
        stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
        if stop is not None:
            results.append((row[:stop + 1], "eos"))
        else:
            results.append((row[:max_new_tokens], "length"))
    return results
