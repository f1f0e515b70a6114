"""Context loading and position selection."""

import json

import numpy as np
import pytest

from teachdiag.contexts import check_token_ids, load_contexts, parse_positions, select_positions
from teachdiag.errors import InputError


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_loads_fields_and_teacher_view(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"id": "a", "prompt_ids": [1, 2], "response_ids": [3, 4, 5]},
                                     {"id": "b", "prompt_ids": [1], "response_ids": [3], "teacher_prompt_ids": [9, 9],
                                      "meta": {"k": 1}}])
    a, b = load_contexts(p)
    assert a.teacher_view == [1, 2] and b.teacher_view == [9, 9] and b.meta["k"] == 1
    assert (a.line, b.line) == (1, 2)
    assert load_contexts(p, max_response_tokens=2)[0].response_ids == [3, 4]


def test_select_positions_all_and_sample():
    class C:
        def __init__(self, n):
            self.response_ids = list(range(n))

    ctxs = [C(3), C(1), C(4)]
    assert select_positions(ctxs, "all", 0) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]
    s = select_positions(ctxs, 5, seed=1)
    assert len(s) == 5 and s == sorted(s) and len(set(s)) == 5
    assert s == select_positions(ctxs, 5, seed=1) and s != select_positions(ctxs, 5, seed=2)
    assert len(select_positions(ctxs, 100, seed=0)) == 8  # capped at what exists
    # uniform over positions, not over contexts: the long context gets about half
    counts = np.zeros(3)
    for seed in range(300):
        for c, _ in select_positions(ctxs, 2, seed):
            counts[c] += 1
    assert counts[2] / counts.sum() == pytest.approx(4 / 8, abs=0.05)


def test_parse_positions():
    assert parse_positions("all") == "all" and parse_positions("12") == 12
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(InputError):
            parse_positions(bad)


def test_too_long_for_the_model(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"id": "a", "prompt_ids": [1] * 5, "response_ids": [2] * 10}])
    with pytest.raises(InputError, match="more than the models' 12 positions"):
        check_token_ids(load_contexts(p), vocab=50, max_positions=12)
    check_token_ids(load_contexts(p, max_response_tokens=7), vocab=50, max_positions=12)


def test_pickles_are_never_loaded(tmp_path):
    p = tmp_path / "ctx.pt"
    p.write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match="never loaded"):
        load_contexts(p)


def test_parquet_wrong_types(tmp_path):
    import pandas as pd

    pd.DataFrame({"id": ["a"], "prompt_ids": ["1 2 3"], "response_ids": [[1, 2]]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c.parquet:1: prompt_ids: must be a list"):
        load_contexts(tmp_path / "c.parquet")


def test_text_records_are_encoded_like_rollouts(tmp_path):
    """A text prompt gets the chat template, as `teachdiag rollout` gives it; --raw-text opts out."""
    from conftest import make_tokenizer
    from teachdiag.contexts import encoding_summary, tokenize_text_records

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    p = write(tmp_path / "t.jsonl", [{"id": "a", "prompt": "what is two", "response": "four"},
                                     {"id": "b", "messages": msgs, "teacher_prompt": "hint two", "response": "x"},
                                     {"id": "c", "prompt_ids": [1], "response_ids": [2]}])

    def chat(m):  # independent of encode_prompt: the template's text, tokenized without extra specials
        return tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    a, b, c = tokenize_text_records(load_contexts(p), tok)
    assert a.prompt_ids == chat([{"role": "user", "content": "what is two"}])
    assert a.response_ids == tok("four", add_special_tokens=False)["input_ids"]
    assert b.prompt_ids == chat(msgs) and b.teacher_prompt_ids == chat([{"role": "user", "content": "hint two"}])
    assert encoding_summary([a, b]) == {"student_view": "chat_template", "teacher_view": "chat_template"}
    assert encoding_summary([a, c])["student_view"] == {"chat_template": 1, "token_ids": 1}

    raw = tokenize_text_records(load_contexts(p), tok, raw=True)
    assert raw[0].prompt_ids == tok("what is two")["input_ids"] and raw[0].encoding["student_view"] == "raw"
    assert raw[1].prompt_ids == chat(msgs)  # messages only have one encoding
    assert raw[1].encoding == {"student_view": "chat_template", "teacher_view": "raw"}


def test_text_record_fields_are_checked(tmp_path):
    p = write(tmp_path / "t.jsonl", [{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}],
                                      "response": "y"}])
    with pytest.raises(InputError, match=r"t.jsonl:1: messages: give either prompt or messages"):
        load_contexts(p)
    p = write(tmp_path / "u.jsonl", [{"id": "a", "teacher_messages": [{"role": "user"}], "prompt": "x",
                                      "response": "y"}])
    with pytest.raises(InputError, match=r"u.jsonl:1: teacher_messages: every message needs"):
        load_contexts(p)


def test_unknown_fields_are_named_with_the_likely_one(tmp_path):
    """A misspelt field is named, with the field it probably means (#21.10.3); before, a misspelt
    `respones` surfaced as `prompt_ids: missing` and a misspelt optional field was silently ignored."""
    good = {"id": "a", "prompt_ids": [1], "response_ids": [2]}
    p = write(tmp_path / "t.jsonl", [good, {"id": "b", "prompt": "x", "respones": "y"}])
    with pytest.raises(InputError) as e:
        load_contexts(p)
    assert str(e.value) == f"{p}:2: respones: unknown field (did you mean 'response'?)"
    p = write(tmp_path / "o.jsonl", [{**good, "teacher_promt_ids": [3]}])
    with pytest.raises(InputError, match=r"o.jsonl:1: teacher_promt_ids: unknown field \(did you mean "
                                         r"'teacher_prompt_ids'\?\)"):
        load_contexts(p)
    p = write(tmp_path / "x.jsonl", [{**good, "source": "gsm8k"}])
    with pytest.raises(InputError, match=r"x.jsonl:1: source: unknown field \(the fields are id, .*; "
                                         r"put anything else in meta\)"):
        load_contexts(p)
    # every documented field, optional ones included, is accepted
    p = write(tmp_path / "ok.jsonl", [{**good, "teacher_prompt_ids": [4], "meta": {"source": "gsm8k"}},
                                      {"id": "c", "prompt": "x", "teacher_prompt": "y", "response": "z"},
                                      {"id": "d", "messages": [{"role": "user", "content": "x"}],
                                       "teacher_messages": [{"role": "user", "content": "y"}], "response": "z"}])
    assert [c.id for c in load_contexts(p)] == ["a", "c", "d"]


def test_parquet_index_column_is_not_an_unknown_field(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"id": ["a", "b"], "prompt_ids": [[1], [2]], "response_ids": [[3], [4]]})
    df[df["id"] == "b"].to_parquet(tmp_path / "c.parquet")  # a filtered frame stores its index as a column
    assert [c.id for c in load_contexts(tmp_path / "c.parquet")] == ["b"]
