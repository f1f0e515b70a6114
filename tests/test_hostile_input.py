"""Random malformed records: the loader either returns valid contexts or raises its own InputError."""

import json

import pytest

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


def test_overflowing_teacher_positions_are_flagged_and_left_out(tmp_path, pair):
    """A teacher whose forward overflows on one token (as fp16 can): those positions are flagged
    finite=0, get no teachability, and analyze excludes them; the rest of the run is unaffected."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import write_contexts
    from teachdiag.table import read_tokens

    teacher = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32)
    with torch.no_grad():
        teacher.get_input_embeddings().weight[7] = float("inf")  # token 7 poisons every later position
    teacher.save_pretrained(tmp_path / "bad_teacher")
    AutoTokenizer.from_pretrained(pair[0]).save_pretrained(tmp_path / "bad_teacher")
    contexts = write_contexts(tmp_path / "ctx.jsonl", n=12, teacher_view=False)
    args = ["probe", "--student", pair[1], "--contexts", str(contexts), "--device", "cpu", "--quiet"]
    assert main([*args, "--teacher", str(tmp_path / "bad_teacher"), "--out", str(tmp_path / "bad")]) == 0
    assert main([*args, "--teacher", pair[0], "--out", str(tmp_path / "good")]) == 0
    bad, good = read_tokens(tmp_path / "bad/tokens.csv"), read_tokens(tmp_path / "good/tokens.csv")

    # the teacher reads prompt + response[:-1] in one forward, and a NaN value row reaches even
    # earlier queries (0 attention × NaN = NaN): the whole context is flagged, not just later positions
    recs = {r["id"]: r for r in map(json.loads, contexts.read_text().splitlines())}
    poisoned = bad["context_id"].map(lambda c: 7 in recs[c]["prompt_ids"] + recs[c]["response_ids"][:-1])
    assert 0 < poisoned.sum() < len(bad)  # the test means something only if both kinds occur
    assert (bad["finite"] == (~poisoned).astype(int)).all()
    assert bad.loc[poisoned, "teachability"].isna().all() and bad.loc[~poisoned, "teachability"].notna().all()
    pd.testing.assert_series_equal(bad.loc[~poisoned, "gain_fkl"], good.loc[~poisoned, "gain_fkl"])
    assert main(["analyze", str(tmp_path / "bad"), "--bootstrap", "20", "--out", str(tmp_path / "an")]) == 0
    assert f"{len(bad)} rows, {poisoned.sum()} excluded" in (tmp_path / "an/summary.md").read_text()


@pytest.mark.parametrize("case", ["5000-digit token id", "nested 200k deep", "id with a lone surrogate"])
def test_hostile_records_are_one_line_errors_before_anything_is_computed(tmp_path, pair, case, capsys):
    """#21.6: records that gave a traceback (Python's int-digit limit, RecursionError, a UnicodeEncodeError
    when the row was written after its context was computed, and again on every resume)."""
    path = tmp_path / "c.jsonl"
    bad = {"5000-digit token id": '{"id": "b", "prompt_ids": [1], "response_ids": [' + "9" * 5000 + "]}",
           "nested 200k deep": '{"id": "b", "prompt_ids": [1], "response_ids": [2], "meta": {"x": '
                               + "[" * 200_000 + "]" * 200_000 + "}}",
           "id with a lone surrogate": '{"id": "b\\ud800", "prompt_ids": [1], "response_ids": [2]}'}[case]
    path.write_text(json.dumps({"id": "a", "prompt_ids": [1, 2], "response_ids": [3, 4]}) + "\n" + bad + "\n")
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(path), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"teachdiag: error: {path}:2: "), err
    assert "Traceback" not in err and not out.exists()  # refused while reading: nothing computed
    if case == "id with a lone surrogate":
        assert err.startswith(f"teachdiag: error: {path}:2: id: not valid Unicode"), err


@pytest.mark.parametrize("fault", ["disk full mid-run", "folder read-only mid-run", "disk full at the merge",
                                   "analyze --out read-only", "train --out a file"])
def test_environment_faults_are_one_line_and_lose_nothing(tmp_path, pair, fault, monkeypatch, capsys):
    """#21.7: a write that fails (ENOSPC, EROFS; injected at the n-th write, half written where a real disk
    would tear it) is one line naming the file, not a traceback; --resume then gives the uninterrupted table."""
    import errno
    import os
    from pathlib import Path

    import pandas as pd

    import teachdiag.durable as durable
    import teachdiag.runfolder as runfolder
    from conftest import write_contexts
    from teachdiag.table import read_tokens

    contexts = write_contexts(tmp_path / "c.jsonl", n=5)
    probe = ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
             "--quiet", "--out"]
    assert main([*probe, str(tmp_path / "full")]) == 0
    out, calls, real = tmp_path / "r", [0], runfolder._fsync_write
    code, n = {"disk full mid-run": (errno.ENOSPC, 4), "folder read-only mid-run": (errno.EROFS, 5),
               "disk full at the merge": (errno.ENOSPC, None)}.get(fault, (errno.EROFS, None))

    def failing_write(path, text, mode="a"):
        calls[0] += 1
        if calls[0] == n or (n is None and Path(path).name == "tokens.csv.tmp"):
            if code == errno.ENOSPC:
                real(path, text[: len(text) // 2], mode)
            raise OSError(code, os.strerror(code), str(path))
        return real(path, text, mode)

    capsys.readouterr()
    if fault == "analyze --out read-only":
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if self.name == "ro":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        assert main(["analyze", str(tmp_path / "full"), "--bootstrap", "0", "--out", str(tmp_path / "ro")]) == 2
        want = f"teachdiag: error: {tmp_path / 'ro'}: --out: cannot write there (Read-only file system)"
    elif fault == "train --out a file":
        (tmp_path / "ckpt").write_text("precious")
        assert main(["train", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device",
                     "cpu", "--quiet", "--steps", "1", "--out", str(tmp_path / "ckpt")]) == 2
        want = f"teachdiag: error: {tmp_path / 'ckpt'}: --out: exists and is not a folder"
        assert (tmp_path / "ckpt").read_text() == "precious"
    else:
        for module in (runfolder, durable):  # appends are runfolder's; _atomic_write (the merge) is durable's
            monkeypatch.setattr(module, "_fsync_write", failing_write)
        assert main([*probe, str(out)]) == 2
        want = f"teachdiag: error: {out}/"
        assert not (out / "tokens.csv").exists() and not (out / "tokens.csv.tmp").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(want) and "Traceback" not in err, err
    if out.exists():
        assert os.strerror(code) in err and "--resume" in err
        for module in (runfolder, durable):  # space freed
            monkeypatch.setattr(module, "_fsync_write", real)
        assert main([*probe, str(out), "--resume"]) == 0
        pd.testing.assert_frame_equal(read_tokens(out / "tokens.csv"), read_tokens(tmp_path / "full/tokens.csv"))
