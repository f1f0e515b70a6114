"""Random malformed records: the loader either returns valid contexts or raises its own InputError."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teachdiag.cli import main
from teachdiag.contexts import load_contexts
from teachdiag.errors import InputError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=5))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=4), inner, max_size=3), max_leaves=8)
records = st.dictionaries(st.sampled_from(["id", "prompt_ids", "response_ids", "teacher_prompt_ids", "meta",
                                           "prompt", "response", "teacher_prompt", "other"]), values, max_size=6)
lines = st.lists(st.one_of(records.map(json.dumps), st.text(max_size=20)), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines)
def test_loader_accepts_valid_data_or_raises_input_error(tmp_path, content):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(content) + "\n")
    try:
        ctxs = load_contexts(path)
    except InputError as exc:
        assert str(path) in exc.one_line() and "\n" not in exc.one_line()
        return
    for ctx in ctxs:  # whatever loaded is well formed
        assert isinstance(ctx.id, str) and ctx.id
        if ctx.text is None:
            for ids in (ctx.prompt_ids, ctx.response_ids):
                assert ids and all(type(t) is int and t >= 0 for t in ids)
        else:
            assert isinstance(ctx.text["prompt"], str) and ctx.text["response"]
    assert len({c.id for c in ctxs}) == len(ctxs)


def test_unwritable_out(tmp_path, pair, contexts, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"  # a folder cannot be made under a file (root ignores chmod, not this)
    assert main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("teachdiag: error:") and "--out" in err and len(err.splitlines()) == 1
