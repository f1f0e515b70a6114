"""The Python API a notebook uses: run_probe -> Run(table, record), load_run, analyze, run_train."""

import subprocess
import sys

import teachdiag
from conftest import write_contexts


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
    import pytest

    from teachdiag.errors import InputError

    with pytest.raises(InputError, match="--optimizer"):
        teachdiag.run_probe(optimizer="adamw", out=str(tmp_path / "a"))
    with pytest.raises(InputError, match="--loss"):
        teachdiag.run_probe(loss="kl", out=str(tmp_path / "b"))
