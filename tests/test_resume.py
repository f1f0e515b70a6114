"""A run killed with SIGKILL keeps what it finished; --resume completes it with no lost or doubled rows."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import write_contexts
from teachdiag.cli import main
from teachdiag.table import read_tokens


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # same thread count in every run: same float reductions


def cli(args: list[str], wait: bool = True):
    proc = subprocess.Popen([sys.executable, "-m", "teachdiag", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.wait() if wait else proc


def cmd(pair, contexts, out, *extra):
    return ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--out", str(out),
            "--device", "cpu", "--quiet", *extra]


def wait_for_contexts(proc, out, n: int):
    """Wait (at most 2 min) until the running probe has recorded n finished contexts; the progress file."""
    progress = out / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= n:
            break
        time.sleep(0.01)
    return progress


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, pair):
    contexts = write_contexts(tmp_path / "many.jsonl", n=80)
    assert cli(cmd(pair, contexts, tmp_path / "full")) == 0
    full = read_tokens(tmp_path / "full/tokens.csv")

    out = tmp_path / "killed"
    proc = cli(cmd(pair, contexts, out), wait=False)
    progress = wait_for_contexts(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(progress.read_text().splitlines())
    assert 5 <= n_done < 80, "the run must be killed mid-way for this test to mean anything"
    assert not (out / "tokens.csv").exists()
    assert json.loads((out / "run.json").read_text())["complete"] is False

    with open(out / "tokens.partial.csv", "a") as f:  # a torn write, as a crash mid-context leaves
        f.write("c999,0,1,a,0.5")
    assert main(["analyze", str(out)]) == 2  # incomplete runs are refused without --allow-partial
    assert cli(cmd(pair, contexts, out, "--resume")) == 0
    resumed = read_tokens(out / "tokens.csv")
    pd.testing.assert_frame_equal(resumed, full)
    assert json.loads((out / "run.json").read_text())["complete"] is True


def test_resume_refuses_changed_options(tmp_path, pair, contexts, capsys):
    out = tmp_path / "r"
    assert main(cmd(pair, contexts, out)) == 0
    assert main(cmd(pair, contexts, out, "--resume", "--top-k", "4")) == 2
    assert "option top_k differs" in capsys.readouterr().err


def test_resume_refuses_a_finished_or_foreign_run(tmp_path, pair, contexts, capsys):
    out = tmp_path / "r"
    assert main(cmd(pair, contexts, out)) == 0
    before = (out / "tokens.csv").read_text()
    assert main(cmd(pair, contexts, out, "--resume")) == 2
    assert "already complete" in capsys.readouterr().err
    assert (out / "tokens.csv").read_text() == before  # nothing redone, nothing lost
    (out / "run.json").write_text("{not json")
    assert main(cmd(pair, contexts, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "not a teachdiag run record" in err and "Traceback" not in err


def test_failed_load_keeps_the_old_run(tmp_path, pair, contexts, capsys):
    out = tmp_path / "r"
    assert main(cmd(pair, contexts, out)) == 0
    assert main(cmd((pair[0], str(tmp_path / "missing")), contexts, out, "--overwrite")) == 2
    assert (out / "tokens.csv").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_contexts(tmp_path, pair):
    contexts = write_contexts(tmp_path / "many.jsonl", n=80)
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "teachdiag", *cmd(pair, contexts, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = wait_for_contexts(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["teachdiag: interrupted; finished contexts are saved (rerun with --resume)"]
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] is False and record["interrupted"] is True
    n_done = len(progress.read_text().splitlines())
    assert 3 <= n_done < 80 and not (out / "tokens.csv").exists()
    kept = read_tokens(out / "tokens.partial.csv")  # whole contexts only, each once
    assert kept["context_id"].nunique() == n_done and not kept.duplicated(["context_id", "position"]).any()
    assert cli(cmd(pair, contexts, out, "--resume")) == 0
    assert len(read_tokens(out / "tokens.csv")) == sum(
        len(json.loads(line)["response_ids"]) for line in contexts.read_text().splitlines())


def test_resume_refuses_parts_with_other_columns(tmp_path, pair, contexts, capsys):
    """A folder begun by a version with other tokens.csv columns is not continued (rows would misalign)."""
    out = tmp_path / "r"
    assert main(cmd(pair, contexts, out)) == 0
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(record, complete=False)))
    (out / "tokens.partial.csv").write_text("context_id,position,fkl\nc0,0,0.5\n")
    (out / "progress.jsonl").write_text(json.dumps({"id": "c0", "bytes": 38}) + "\n")
    assert main(cmd(pair, contexts, out, "--resume")) == 2
    assert "columns differ" in capsys.readouterr().err


def test_a_run_begun_before_an_option_existed_resumes_with_the_value_it_had(tmp_path):
    """check_resume(added=...): run.json written before --signals has no such option; it resumes as
    signals=full, and is refused (naming the option) if asked to resume as topk."""
    from teachdiag.errors import InputError
    from teachdiag.runtable import RunWriter
    from teachdiag.commands.probe import RESUME_KEYS

    models = {"teacher": {"weights_sha256": "t"}, "student": {"weights_sha256": "s"}}
    old = {"options": {"top_k": 16, "loss": "reverse_kl"}, "contexts": {"sha256": "c"}, **models}
    (tmp_path / "run.json").write_text(json.dumps(old))
    writer = RunWriter(tmp_path, resume=True)
    new = dict(old, options={**old["options"], "signals": "full"})
    writer.check_resume(new, RESUME_KEYS, added={"signals": "full"})
    with pytest.raises(InputError, match="option signals differs"):
        writer.check_resume(dict(old, options={**old["options"], "signals": "topk"}), RESUME_KEYS,
                            added={"signals": "full"})
    with pytest.raises(InputError, match="option signals differs"):  # without `added`: None vs "full"
        writer.check_resume(new, RESUME_KEYS)


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path, pair, contexts, monkeypatch):
    """#21.3: a probe started on a folder another probe is still loading models into is refused in one
    line naming the holder's pid (before, both computed everything and the folder could not be resumed);
    the first lets go when it ends, and a holder killed with SIGKILL leaves no stale lock."""
    import teachdiag.pair as opening  # where every command loads its pair
    from teachdiag.errors import InputError

    out, second = tmp_path / "r", {}
    real = opening.load_models

    def start_another_while_loading(*a, **k):  # the first run has --out, its models not yet loaded
        if not second:
            p = subprocess.run([sys.executable, "-m", "teachdiag", *cmd(pair, contexts, out)], env=ENV,
                               capture_output=True, text=True, timeout=600)
            second.update(rc=p.returncode, err=p.stderr.strip())
        return real(*a, **k)

    monkeypatch.setattr(opening, "load_models", start_another_while_loading)
    assert main(cmd(pair, contexts, out)) == 0
    assert second["rc"] == 2, second["err"]
    assert len(second["err"].splitlines()) == 1 and f"pid {os.getpid()}" in second["err"], second["err"]
    table = read_tokens(out / "tokens.csv")
    assert not table.duplicated(["context_id", "position"]).any()
    assert json.loads((out / "run.json").read_text())["complete"] is True

    from teachdiag.runfolder import lock_folder, release_locks

    held = out  # let go when the first run ended: another process can take it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from teachdiag.runfolder import lock_folder; lock_folder(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(held)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            lock_folder(held)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_folder(held)  # free again, though the lock file is still there
    release_locks()


class Kill(BaseException):
    """A kill -9 at an injected point: nothing after it runs."""


def kill_probe_after(monkeypatch, n_contexts: int):
    """The next probe dies as it appends its (n_contexts + 1)-th context."""
    from teachdiag.runtable import RunWriter

    real, calls = RunWriter.append_context, [0]

    def append(self, context_id, rows):
        calls[0] += 1
        if calls[0] > n_contexts:
            raise Kill
        return real(self, context_id, rows)

    monkeypatch.setattr(RunWriter, "append_context", append)
    return lambda: monkeypatch.setattr(RunWriter, "append_context", real)


@pytest.mark.parametrize("damage", ["partial cut short", "a middle row doubled"])
def test_a_damaged_run_folder_resumes_to_the_uninterrupted_table(tmp_path, pair, damage, monkeypatch):
    """#21.5: the parts of a killed run damaged on disk: resume cuts them back to their last sound
    context and recomputes the rest (before: NUL padding and a ParserError, or "a row appears twice",
    on every resume)."""
    contexts = write_contexts(tmp_path / "c.jsonl", n=8)
    assert main(cmd(pair, contexts, tmp_path / "full")) == 0
    out = tmp_path / "r"
    undo = kill_probe_after(monkeypatch, 5)
    with pytest.raises(Kill):
        main(cmd(pair, contexts, out))
    undo()
    partial = out / "tokens.partial.csv"
    lines = partial.read_text().splitlines(keepends=True)
    if damage == "partial cut short":  # the file lost its last rows; progress.jsonl still counts them
        partial.write_text("".join(lines[:-2]))
    else:
        partial.write_text("".join(lines[:4] + lines[3:]))
    assert main(cmd(pair, contexts, out, "--resume")) == 0
    pd.testing.assert_frame_equal(read_tokens(out / "tokens.csv"), read_tokens(tmp_path / "full/tokens.csv"))
