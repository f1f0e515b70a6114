"""Teacher and student tokenizers compared by what their ids mean, not by their Python class.

    from teachdiag.tokenizers import compare_tokenizers, tokenizer_fingerprint
    match = compare_tokenizers(teacher_tok, student_tok, "T", "S")   # a TokenizerMatch
    match.shared_ids      # None: identical; else the sorted ids both read the same way
    match.differing       # [{"id", "kind", "teacher", "student"}] for added/special ids that differ

Why meaning and not class: transformers 5.x picks the tokenizer class from the model's config,
so byte-identical tokenizer files load as `Qwen2Tokenizer` next to a Qwen2 config and as the
generic backend next to a Qwen3 config. What matters to the probe is that id i is the same
string for both models, and that both split a text into the same ids.

Real distillation pairs share the regular vocabulary and differ in added/special tokens
(Qwen2.5 → Qwen3 adds four; DeepSeek-R1-Distill-Qwen renames some special ids of Qwen2.5).
Those run over the ids both agree on, with one line on stderr; `strict=True` refuses them.
A pair whose regular vocabularies disagree is always an InputError naming the first such id.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

from teachdiag.errors import InputError

# texts every tokenizer of a pair must split identically; free of "<", so no added token can match
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! 12345 + 678 = 13023; x**2 - 3.14e-5",
    "def f(x):\n    return [i for i in range(x)]\n\n\tindented\ttabs",
    "naïve café — Grüße, 東京タワー, Москва, 😀👍",
    "   leading spaces, trailing spaces   ",
    " a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
)


@dataclass
class TokenizerMatch:
    """How a teacher's and a student's tokenizers relate (the run record's `tokenizer` entry).

    `vocab` is the larger of the two lengths: every id of either tokenizer is below it.
    `shared_ids` is None when the tokenizers are identical in meaning, else the sorted ids
    (< vocab) on which both give the same string. `differing` lists every other id below
    `vocab`: {"id", "kind" ("special" | "added"), "teacher", "student"}, a string or None where
    that tokenizer has no such id.
    """

    fingerprint: str  # the student's tokenizer_fingerprint
    vocab: int
    shared_ids: list[int] | None = None
    differing: list[dict] = field(default_factory=list)
    teacher_fingerprint: str = ""

    def record(self) -> dict:
        """For run.json: the ids that differ, not the (long) list of shared ones."""
        return {"fingerprint": self.fingerprint, "teacher_fingerprint": self.teacher_fingerprint,
                "vocab": self.vocab, "identical": self.shared_ids is None,
                "n_shared_ids": self.vocab if self.shared_ids is None else len(self.shared_ids),
                "differing": self.differing}


# ---------------------------------------------------------------------------- meaning

def id_strings(tok) -> list[str | None]:
    """id -> token string for every id of the tokenizer (added tokens included)."""
    n = len(tok)
    return [None if s is None else str(s) for s in tok.convert_ids_to_tokens(list(range(n)))]


def added_ids(tok) -> dict[int, bool]:
    """Ids of added tokens (not in the base model's vocabulary) -> whether they are special."""
    out = {int(i): bool(getattr(t, "special", False)) for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    for i in getattr(tok, "all_special_ids", []) or []:
        out[int(i)] = True
    return out


def probe_encodings(tok) -> list[list[int] | None]:
    """How PROBE_TEXTS map to ids (None where the tokenizer cannot encode one)."""
    out = []
    for text in PROBE_TEXTS:
        try:
            out.append([int(i) for i in tok(text, add_special_tokens=False)["input_ids"]])
        except Exception:  # a tokenizer without byte fallback may refuse some characters: that is its meaning
            out.append(None)
    return out


def tokenizer_fingerprint(tok, _meaning: tuple | None = None) -> str:
    """sha256 of the meaning: id -> string for every id, which ids are special, and the probe
    texts' ids. Equal for byte-identical files whatever class transformers loads them as."""
    strings, added, probes = _meaning or (id_strings(tok), added_ids(tok), probe_encodings(tok))
    payload = {"ids": strings, "special": sorted(i for i, s in added.items() if s), "probes": probes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- comparison

def compare_tokenizers(teacher_tok, student_tok, teacher: str, student: str,
                       strict: bool = False) -> TokenizerMatch:
    """Decide whether a pair can be compared, and over which ids.

    Identical meaning: shared_ids None. Regular vocabularies agree but added/special ids differ:
    the agreed ids, the differing ones, one line on stderr (InputError if `strict`). Regular ids
    that disagree, or probe texts split differently: InputError naming the first difference.
    """
    t_meaning = id_strings(teacher_tok), added_ids(teacher_tok), probe_encodings(teacher_tok)
    s_meaning = id_strings(student_tok), added_ids(student_tok), probe_encodings(student_tok)
    (t_ids, t_added, t_probes), (s_ids, s_added, s_probes) = t_meaning, s_meaning
    vocab = max(len(t_ids), len(s_ids))
    fingerprint = tokenizer_fingerprint(student_tok, s_meaning)
    t_fingerprint = tokenizer_fingerprint(teacher_tok, t_meaning)

    shared, differing = [], []
    for i in range(vocab):
        ts = t_ids[i] if i < len(t_ids) else None
        ss = s_ids[i] if i < len(s_ids) else None
        if ts == ss and ts is not None:
            shared.append(i)
            continue
        if i not in t_added and i not in s_added:  # a regular id whose meaning differs: never comparable
            raise InputError(f"teacher and student tokenizers differ on regular token id {i}: "
                             f"{teacher} has {ts!r}, {student} has {ss!r}; teachdiag compares "
                             "distributions over one shared vocabulary", field="--teacher")
        special = t_added.get(i, False) or s_added.get(i, False)
        differing.append({"id": i, "kind": "special" if special else "added", "teacher": ts, "student": ss})

    for text, te, se in zip(PROBE_TEXTS, t_probes, s_probes):
        if te != se:
            raise InputError(f"teacher and student tokenizers differ: they split {text!r} differently "
                             f"({teacher}: {te}, {student}: {se}); their merges or pre-tokenizers "
                             "disagree", field="--teacher")

    if not differing:
        return TokenizerMatch(fingerprint, vocab, None, [], t_fingerprint)
    summary = _summary(differing)
    if strict:
        raise InputError(f"teacher and student tokenizers differ on {summary} (--strict-tokenizer)",
                         field="--teacher")
    print(f"teachdiag: tokenizers differ on {summary}; comparing over the {len(shared)} ids both "
          "agree on (listed in run.json; --strict-tokenizer refuses such pairs)", file=sys.stderr)
    return TokenizerMatch(fingerprint, vocab, shared, differing, t_fingerprint)


def _summary(differing: list[dict]) -> str:
    """'4 ids (4 added: only the teacher has 151665-151668)' and the like, for one line."""
    kinds: dict[str, list[int]] = {}
    for d in differing:
        where = ("only the teacher has" if d["student"] is None else
                 "only the student has" if d["teacher"] is None else "renamed")
        kinds.setdefault(f"{d['kind']}, {where}", []).append(d["id"])
    parts = [f"{len(ids)} {kind} {_ranges(ids)}" for kind, ids in kinds.items()]
    return f"{len(differing)} ids ({'; '.join(parts)})"


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (first five runs)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:5])
    return text + (", ..." if len(runs) > 5 else "")
