"""Frozen contexts (student rollouts): load, validate, truncate, pick positions.

    from teachdiag.contexts import load_contexts, select_positions
    ctxs = load_contexts("rollouts.jsonl")                   # JSONL or .parquet
    ctxs = tokenize_text_records(ctxs, student_tokenizer)    # only if records carry text
    encoding_summary(ctxs)    # {"student_view": "chat_template", "teacher_view": "token_ids"}
    check_token_ids(ctxs, vocab=49152, max_positions=8192)
    picks = select_positions(ctxs, "all" | 2000, seed=0)     # [(context index, position)]

A record: {"id": str, "prompt_ids": [int], "response_ids": [int] (non-empty),
"teacher_prompt_ids": [int] (optional), "meta": {} (optional)}, or the text form
{"id", "prompt" or "messages", "response", "teacher_prompt" or "teacher_messages" (optional)}.
Position j predicts response_ids[j]: the student sees prompt_ids + response_ids[:j], the teacher
teacher_prompt_ids + response_ids[:j].

Text prompts are encoded exactly as `teachdiag rollout` encodes them (encode_prompt): through the
chat template when the tokenizer has one, so a prompt probed from text is the prompt the student
answered on-policy. raw=True (--raw-text) tokenizes prompt strings as plain text instead. The
response text is tokenized as is, without special tokens.
Every problem is an InputError naming file, line and field; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from teachdiag.errors import InputError

ID_FIELDS = ("prompt_ids", "response_ids", "teacher_prompt_ids")
MESSAGE_FIELDS = ("messages", "teacher_messages")
# every field a record may have; anything else is most likely a misspelling, so it is refused
# rather than ignored (a misspelt teacher_prompt_ids would silently give the teacher the student's view)
FIELDS = ("id", *ID_FIELDS, "meta", "prompt", "messages", "response", "teacher_prompt", "teacher_messages")


@dataclass
class Context:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]
    teacher_prompt_ids: list[int] | None = None
    meta: dict = field(default_factory=dict)
    text: dict | None = None  # text-form record, until tokenized
    file: str = ""
    line: int = 0  # 1-based line (JSONL) or row (Parquet) in `file`
    # how each view became ids: "token_ids" (given), "chat_template" or "raw" (encode_prompt)
    encoding: dict = field(default_factory=lambda: {"student_view": "token_ids", "teacher_view": "token_ids"})

    @property
    def teacher_view(self) -> list[int]:
        return self.prompt_ids if self.teacher_prompt_ids is None else self.teacher_prompt_ids


# ---------------------------------------------------------------------------- reading

def read_jsonl(path: str | Path):
    """Yield (line number, object) from a JSONL file; a bad line is an InputError naming it."""
    try:
        with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte gets its own line number
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError("not UTF-8 text (JSONL expected)", file=str(path), line=lineno) from None
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputError(f"malformed JSON ({exc.msg}, column {exc.colno})",
                                     file=str(path), line=lineno) from None
                except ValueError as exc:  # an integer past Python's digit limit (4300)
                    raise InputError(f"unreadable JSON ({str(exc).split(';')[0]})", file=str(path),
                                     line=lineno) from None
                except RecursionError:
                    raise InputError("unreadable JSON (nested too deeply)", file=str(path), line=lineno) from None
                if not isinstance(rec, dict):
                    raise InputError(f"a record must be a JSON object, got {type(rec).__name__}",
                                     file=str(path), line=lineno)
                yield lineno, rec
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", file=str(path)) from None


def _records(path: Path):
    """Yield (line number, record dict) from JSONL or Parquet."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise InputError(f"not a readable Parquet file ({str(exc).splitlines()[0]})",
                             file=str(path)) from None
        yield from enumerate(rows, start=1)
        return
    yield from read_jsonl(path)


def _token_list(value, where: dict, name: str, allow_empty: bool) -> list[int]:
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise InputError(f"must be a list of token ids, got {type(value).__name__}", field=name, **where)
    for tok in value:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise InputError(f"token id {tok!r} is not an integer", field=name, **where)
        if tok < 0:
            raise InputError(f"token id {tok} is negative", field=name, **where)
    if not value and not allow_empty:
        raise InputError("is empty", field=name, **where)
    return value


def _parse(rec, path: Path, lineno: int) -> Context:
    where = {"file": str(path), "line": lineno}
    if not isinstance(rec, dict):
        raise InputError(f"a record must be a JSON object, got {type(rec).__name__}", **where)
    check_fields(rec, where)
    rid = rec.get("id")
    if rid is None:
        raise InputError("missing", field="id", **where)
    if not isinstance(rid, str) or not rid:
        raise InputError(f"must be a non-empty string, got {rid!r}", field="id", **where)
    check_unicode(rid, "id", where)
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError("must be an object", field="meta", **where)
    if "response_ids" not in rec and isinstance(rec.get("response"), str):
        return Context(rid, [], [], None, meta, _text_fields(rec, where), str(path), lineno)
    for name in ("prompt_ids", "response_ids"):
        if rec.get(name) is None:
            raise InputError("missing", field=name, **where)
    prompt = _token_list(rec["prompt_ids"], where, "prompt_ids", allow_empty=False)
    response = _token_list(rec["response_ids"], where, "response_ids", allow_empty=False)
    tprompt = None
    if rec.get("teacher_prompt_ids") is not None:
        tprompt = _token_list(rec["teacher_prompt_ids"], where, "teacher_prompt_ids", allow_empty=False)
    return Context(rid, prompt, response, tprompt, meta, None, str(path), lineno)


def check_fields(rec: dict, where: dict) -> None:
    """The first field not in FIELDS is an InputError naming it, with the field it probably means."""
    import difflib

    for name in rec:
        if name in FIELDS or str(name).startswith("__index_level_"):  # pandas' index column in Parquet
            continue
        close = difflib.get_close_matches(str(name), FIELDS, n=1, cutoff=0.75)
        hint = (f"did you mean {close[0]!r}?" if close else
                f"the fields are {', '.join(FIELDS)}; put anything else in meta")
        raise InputError(f"unknown field ({hint})", field=str(name), **where)


def check_unicode(text: str, name: str, where: dict) -> None:
    """A string must be writable as UTF-8: JSON's "\\ud800" reads as a lone surrogate, which would fail
    only when the row is written, after its context was computed (and again on every resume)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"not valid Unicode (a lone surrogate {text[exc.start]!r} at character {exc.start})",
                         field=name, **where) from None


def _text_fields(rec: dict, where: dict) -> dict:
    """The text form of a record: response, prompt or messages, teacher_prompt or teacher_messages."""
    if not rec["response"]:
        raise InputError("is empty", field="response", **where)
    check_unicode(rec["response"], "response", where)
    text = {"response": rec["response"]}
    for text_key, msgs_key, required in (("prompt", "messages", True), ("teacher_prompt", "teacher_messages", False)):
        has_text, has_msgs = rec.get(text_key) is not None, rec.get(msgs_key) is not None
        if has_text and has_msgs:
            raise InputError(f"give either {text_key} or {msgs_key}, not both", field=msgs_key, **where)
        if has_text:
            if not isinstance(rec[text_key], str) or not rec[text_key]:
                raise InputError("must be a non-empty string", field=text_key, **where)
            check_unicode(rec[text_key], text_key, where)
            text[text_key] = rec[text_key]
        elif has_msgs:
            text[text_key] = check_messages(rec[msgs_key], msgs_key, where)
        elif required:
            raise InputError("missing (text records need prompt or messages, and response)",
                             field=text_key, **where)
    return text


def check_messages(msgs, name: str, where: dict) -> list[dict]:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(msgs, list) or not msgs:
        raise InputError("must be a non-empty list of {role, content} objects", field=name, **where)
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError("every message needs string role and content", field=name, **where)
        check_unicode(m["role"] + m["content"], name, where)
    return msgs


def load_contexts(path: str | Path, max_response_tokens: int | None = None) -> list[Context]:
    """Read and validate every record; truncate responses to `max_response_tokens`."""
    path = Path(path)
    if not path.is_file():
        raise InputError("contexts file not found", file=str(path), field="--contexts")
    if path.suffix in (".pt", ".pkl", ".pickle", ".bin"):
        raise InputError("pickled inputs are never loaded; use JSONL or Parquet", file=str(path))
    if max_response_tokens is not None and max_response_tokens < 1:
        raise InputError("must be >= 1", field="--max-response-tokens")
    out, seen = [], {}
    for lineno, rec in _records(path):
        ctx = _parse(rec, path, lineno)
        if ctx.id in seen:
            raise InputError(f"duplicate id {ctx.id!r} (first at line {seen[ctx.id]})",
                             file=str(path), line=lineno, field="id")
        seen[ctx.id] = lineno
        if max_response_tokens is not None and ctx.text is None:
            ctx.response_ids = ctx.response_ids[:max_response_tokens]
        ctx.meta.setdefault("max_response_tokens", max_response_tokens)
        out.append(ctx)
    if not out:
        raise InputError("no records", file=str(path))
    return out


def prompt_encoding(tokenizer, prompt, raw: bool = False) -> str:
    """How encode_prompt turns `prompt` into ids: "chat_template" or "raw"."""
    return "chat_template" if getattr(tokenizer, "chat_template", None) and not (raw and isinstance(prompt, str)) \
        else "raw"


def encode_prompt(tokenizer, prompt, file: str = "", line: int | None = None, field_name: str = "prompt",
                  raw: bool = False) -> list[int]:
    """Token ids of a prompt as the model sees it: the one encoding rollouts and text contexts share.

    With a chat template, a string becomes one user message and the generation prompt (the
    assistant header) is appended; a message list goes through the template as is. Without one
    (or with raw=True), a string is tokenized as plain text with the tokenizer's special tokens
    (BOS, if any); message lists then need a template.
    """
    if prompt_encoding(tokenizer, prompt, raw) == "chat_template":
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # the template already wrote the special tokens it wants (BOS included, if any)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if not isinstance(prompt, str):
            raise InputError("messages need a tokenizer with a chat template", file, line, field_name)
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise InputError("encodes to no tokens", file, line, field_name)
    return list(map(int, ids))


def tokenize_text_records(ctxs: list[Context], tokenizer, max_response_tokens: int | None = None,
                          raw: bool = False) -> list[Context]:
    """Tokenize text-form records once with the student's tokenizer (ids are then recorded).

    Prompts go through encode_prompt (the chat template, as rollouts; raw=True: plain text);
    the response is tokenized as plain text without special tokens."""
    for ctx in ctxs:
        if ctx.text is None:
            continue
        where = {"file": ctx.file, "line": ctx.line}
        t = ctx.text
        s_field = "prompt" if isinstance(t["prompt"], str) else "messages"
        ctx.prompt_ids = encode_prompt(tokenizer, t["prompt"], ctx.file, ctx.line, s_field, raw)
        view = prompt_encoding(tokenizer, t["prompt"], raw)
        ctx.encoding = {"student_view": view, "teacher_view": view}
        ctx.response_ids = tokenizer(t["response"], add_special_tokens=False)["input_ids"][:max_response_tokens]
        if "teacher_prompt" in t:
            t_field = "teacher_prompt" if isinstance(t["teacher_prompt"], str) else "teacher_messages"
            ctx.teacher_prompt_ids = encode_prompt(tokenizer, t["teacher_prompt"], ctx.file, ctx.line, t_field, raw)
            ctx.encoding["teacher_view"] = prompt_encoding(tokenizer, t["teacher_prompt"], raw)
        if not ctx.response_ids:
            raise InputError("tokenizes to nothing", field="response", **where)
        ctx.text = None
    return ctxs


def encoding_summary(ctxs: list[Context]) -> dict:
    """For run.json: how each view was encoded, e.g. {"student_view": "chat_template",
    "teacher_view": "chat_template"}; a mixed file gives counts, {"token_ids": 3, "raw": 1}."""
    out = {}
    for view in ("student_view", "teacher_view"):
        counts: dict[str, int] = {}
        for c in ctxs:
            counts[c.encoding[view]] = counts.get(c.encoding[view], 0) + 1
        out[view] = next(iter(counts)) if len(counts) == 1 else counts
    return out


def check_token_ids(ctxs: list[Context], vocab: int, max_positions: int | None = None) -> None:
    """Every id must index the shared vocabulary; every sequence must fit the models."""
    for ctx in ctxs:
        where = {"file": ctx.file, "line": ctx.line}
        for name in ID_FIELDS:
            ids = getattr(ctx, name)
            if ids and max(ids) >= vocab:
                raise InputError(f"token id {max(ids)} >= vocabulary size {vocab}", field=name, **where)
        longest = max(len(ctx.prompt_ids), len(ctx.teacher_view)) + len(ctx.response_ids)
        if max_positions is not None and longest > max_positions:
            raise InputError(f"prompt + response is {longest} tokens, more than the models' "
                             f"{max_positions} positions; use --max-response-tokens",
                             field="response_ids", **where)


# ---------------------------------------------------------------------------- positions

def select_positions(ctxs: list[Context], positions: str | int, seed: int) -> list[tuple[int, int]]:
    """(context index, position) pairs to probe, in file order.

    'all' takes every response position; an integer N takes a seeded uniform sample of N
    positions over the whole file (capped at the number available). The sample depends
    only on the file and the seed, never on how the work is split.
    """
    counts = np.array([len(c.response_ids) for c in ctxs], dtype=np.int64)
    total = int(counts.sum())
    if positions == "all":
        flat = np.arange(total)
    else:
        n = int(positions)
        if n < 1:
            raise InputError(f"must be 'all' or a positive integer, got {positions!r}", field="--positions")
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ctx_idx = np.searchsorted(starts, flat, side="right") - 1
    return [(int(c), int(f - starts[c])) for c, f in zip(ctx_idx, flat)]


def by_context(picks: list[tuple[int, int]]) -> dict[int, list[int]]:
    """select_positions' pairs grouped: context index -> its positions, both in file order."""
    out: dict[int, list[int]] = {}
    for c, j in picks:
        out.setdefault(c, []).append(j)
    return out


def parse_positions(value: str) -> str | int:
    """CLI value of --positions: 'all' or a positive integer."""
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"must be 'all' or a positive integer, got {value!r}", field="--positions") from None
    if n < 1 or not math.isfinite(n):
        raise InputError(f"must be 'all' or a positive integer, got {value!r}", field="--positions")
    return n
