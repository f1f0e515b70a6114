"""torchrun sharding: 2 ranks on CPU (gloo) give the table of 1 rank, value for value; parts of any
world size merge and resume."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import write_contexts
from teachdiag.cli import main
from teachdiag.runtable import RunWriter
from teachdiag.table import read_tokens

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # same thread count in every process: same float reductions


def probe_args(pair, contexts, out, *extra):
    return ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts),
            "--out", str(out), "--device", "cpu", "--quiet", "--positions", "25", "--seed", "3", *extra]


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, pair):
    contexts = write_contexts(tmp_path / "ctx.jsonl", n=11)
    one = subprocess.run([sys.executable, "-m", "teachdiag", *probe_args(pair, contexts, tmp_path / "one")],
                         env=ENV, capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "teachdiag", *probe_args(pair, contexts, tmp_path / "two")],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # one summary, from rank 0
    a, b = read_tokens(tmp_path / "one/tokens.csv"), read_tokens(tmp_path / "two/tokens.csv")
    assert len(a) == 25 and a["context_id"].nunique() > 2  # both ranks had work
    pd.testing.assert_frame_equal(a, b)  # same rows, same order, same floats
    assert (tmp_path / "one/tokens.csv").read_bytes() == (tmp_path / "two/tokens.csv").read_bytes()
    record = json.loads((tmp_path / "two/run.json").read_text())
    assert record["world_size"] == 2 and record["complete"] is True
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != ".teachdiag.lock") == ["run.json", "tokens.csv"]


def test_resume_merges_the_parts_of_a_larger_world(tmp_path, pair):
    """A 3-rank run dies part-way (rank 2 mid-write); one process resumes it and gets the full table."""
    contexts = write_contexts(tmp_path / "ctx.jsonl", n=9)
    assert main(probe_args(pair, contexts, tmp_path / "full")) == 0
    full = read_tokens(tmp_path / "full/tokens.csv")
    record = json.loads((tmp_path / "full/run.json").read_text())

    out = tmp_path / "died"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(dict(record, complete=False, world_size=3)))
    order = list(dict.fromkeys(full["context_id"]))
    for rank in range(3):
        writer = RunWriter(out, resume=True, rank=rank)
        for cid in order[rank::3][:1]:  # each rank finished its first context only
            rows = full[full["context_id"] == cid].drop(columns=["teachability", "incompat"])
            writer.append_context(cid, rows.to_dict("records"))
    with open(out / "tokens.partial.rank2.csv", "a") as f:
        f.write("c7,1,2,b,0.25")  # torn: rank 2 was killed inside its second context
    assert not (out / "tokens.csv").exists()

    assert main(probe_args(pair, contexts, out, "--resume")) == 0
    pd.testing.assert_frame_equal(read_tokens(out / "tokens.csv"), full)
    # the lock file stays (deleting a lock file others may hold open would let two runs in): it means nothing
    assert sorted(p.name for p in out.iterdir() if p.name != ".teachdiag.lock") == ["run.json", "tokens.csv"]


def test_merge_refuses_parts_that_do_not_make_the_run(tmp_path):
    row = {"context_id": "a", "position": 0, "token_id": 1, "token": "x", "union_fkl": 0.1, "compat_mass": 0.5,
           "finite": 1}
    w0, w1 = RunWriter(tmp_path, rank=0), RunWriter(tmp_path, resume=True, rank=1)
    w0.append_context("a", [row])
    w1.append_context("a", [row])  # the same context on two ranks
    with pytest.raises(RuntimeError, match="twice"):
        w0.finish({}, order=["a"])
    with pytest.raises(RuntimeError, match="1 contexts missing"):
        w0.finish({}, order=["a", "b"])
    assert not (tmp_path / "tokens.csv").exists() and not (tmp_path / "run.json").exists()


def test_teacher_spread_by_accelerate_gives_the_same_table(tmp_path, pair):
    """--teacher-device-map auto (here: all on CPU) goes through accelerate's dispatch path."""
    contexts = write_contexts(tmp_path / "ctx.jsonl", n=5)
    assert main(probe_args(pair, contexts, tmp_path / "plain")) == 0
    assert main(probe_args(pair, contexts, tmp_path / "spread", "--teacher-device-map", "auto")) == 0
    pd.testing.assert_frame_equal(read_tokens(tmp_path / "spread/tokens.csv"), read_tokens(tmp_path / "plain/tokens.csv"))
    assert json.loads((tmp_path / "spread/run.json").read_text())["options"]["teacher_device_map"] == "auto"


def test_torchrun_without_out_is_refused(tmp_path, pair, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group
    contexts = write_contexts(tmp_path / "ctx.jsonl", n=2)
    args = [a for a in probe_args(pair, contexts, "x") if a not in ("--out", "x")]
    assert main(args) == 2
    assert "--out" in capsys.readouterr().err
