"""The Python API a notebook uses: run_probe -> Run(table, record), load_run, analyze, run_train."""

import subprocess
import sys

import pandas as pd
import pytest

import teachdiag
from conftest import write_contexts
from teachdiag.cli import main
from teachdiag.errors import InputError
from teachdiag.runtable import RunWriter


def test_api_round_trip(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    common = dict(teacher=pair[0], student=pair[1], contexts=str(contexts), device="cpu")
    run = teachdiag.run_probe(out=str(tmp_path / "r"), positions="5", **common)
    assert len(run.table) == 5 and run.record["complete"] is True
    again = teachdiag.load_run(tmp_path / "r")
    assert again.table.equals(run.table) and again.record == run.record
    shared = teachdiag.run_probe(out=str(tmp_path / "s"), gain="shared", **common)
    assert set(shared.table["instrument"]) == {"shared"}
    ckpt = teachdiag.run_train(out=str(tmp_path / "t"), steps=1, lr=1e-3, **common)
    after = teachdiag.run_probe(out=str(tmp_path / "c"), student_after=str(ckpt / "model"), **common)
    assert (after.table["gain_fkl"] != 0).any() and set(after.table["instrument"]) == {"checkpoint"}


def test_import_is_light_and_every_name_resolves():
    # a fresh interpreter: `import teachdiag` and load_run must not pull in torch (laptop analysis)
    code = "import sys, teachdiag; teachdiag.load_run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for name in teachdiag.__all__:
        assert getattr(teachdiag, name) is not None


def test_api_refuses_unknown_names_before_loading(tmp_path):
    with pytest.raises(InputError, match="--optimizer"):
        teachdiag.run_probe(optimizer="adamw", out=str(tmp_path / "a"))
    with pytest.raises(InputError, match="--loss"):
        teachdiag.run_probe(loss="kl", out=str(tmp_path / "b"))


class Kill(BaseException):
    """A kill -9 at a chosen write, as the tests below inject it."""


def _full_run(tmp_path, pair) -> list[str]:
    """A finished probe of 3 contexts in tmp_path/full; returns its arguments, less the --out folder."""
    contexts = write_contexts(tmp_path / "c.jsonl", n=3)
    args = ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", "cpu",
            "--quiet", "--out"]
    assert main([*args, str(tmp_path / "full")]) == 0
    return args


def test_a_table_written_but_never_marked_complete_is_not_read_as_finished(tmp_path, pair, monkeypatch):
    """#21.8: a kill between the tokens.csv rename and the run.json update leaves tokens.csv beside
    "complete": false; load_run refuses it in one line (before: read without a word) and --resume
    finishes it to the uninterrupted table."""
    import json

    args = _full_run(tmp_path, pair)
    real = RunWriter.write_record

    def write_record(self, record):
        if record.get("complete") is True:
            raise Kill
        return real(self, record)

    monkeypatch.setattr(RunWriter, "write_record", write_record)
    out = tmp_path / "r"
    with pytest.raises(Kill):
        main([*args, str(out)])
    monkeypatch.setattr(RunWriter, "write_record", real)
    assert (out / "tokens.csv").is_file() and json.loads((out / "run.json").read_text())["complete"] is False
    with pytest.raises(InputError, match="incomplete") as e:
        teachdiag.load_run(out)
    assert e.value.file == str(out / "run.json") and "\n" not in e.value.one_line()
    assert len(teachdiag.load_run(out, allow_partial=True).table) == len(teachdiag.load_run(tmp_path / "full").table)
    assert main([*args, str(out), "--resume"]) == 0
    pd.testing.assert_frame_equal(teachdiag.load_run(out).table, teachdiag.load_run(tmp_path / "full").table)


def test_a_run_killed_before_its_table_was_merged_is_read_with_allow_partial(tmp_path, pair, monkeypatch):
    """A kill after the first context leaves tokens.partial.csv and no tokens.csv: load_run refuses it,
    and with allow_partial gives those rows, equal to the finished run's but for teachability and
    incompat, normalised over the rows present."""
    args = _full_run(tmp_path, pair)
    real = RunWriter.append_context

    def append_context(self, context_id, rows):
        real(self, context_id, rows)
        raise Kill

    monkeypatch.setattr(RunWriter, "append_context", append_context)
    out = tmp_path / "r"
    with pytest.raises(Kill):
        main([*args, str(out)])
    assert not (out / "tokens.csv").exists() and (out / "tokens.partial.csv").is_file()
    with pytest.raises(InputError, match="incomplete"):
        teachdiag.load_run(out)
    part = teachdiag.load_run(out, allow_partial=True).table
    full = teachdiag.load_run(tmp_path / "full").table
    first = full[full["context_id"] == full["context_id"].iloc[0]].reset_index(drop=True)
    assert len(part) == len(first) > 0
    rest = [c for c in full.columns if c not in ("teachability", "incompat")]
    pd.testing.assert_frame_equal(part[rest], first[rest])
    finite = part["finite"] == 1
    assert part.loc[finite, "teachability"].notna().all() and part.loc[~finite, "teachability"].isna().all()
