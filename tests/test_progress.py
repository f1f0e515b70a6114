"""Progress off a terminal: plain lines a log file can hold, not tqdm's carriage returns."""

import subprocess
import sys

from conftest import write_contexts
from teachdiag.progress import LogLines, Silent, progress


def test_log_lines_every_interval_and_at_the_end(capsys):
    bar = progress(total=10, desc="probe", unit="pos", every=0.0)  # captured stderr is not a tty
    assert isinstance(bar, LogLines)
    bar.set_postfix_str("gradient")
    bar.update(4)
    bar.update(6)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("probe: 4/10 pos (40.0%), ") and lines[0].endswith("[gradient]")
    assert lines[1].startswith("probe: 10/10 pos (100.0%)") and "min left" in lines[1]
    assert isinstance(progress(10, "x", "pos", quiet=True), Silent)


def test_only_changes_after_the_interval_are_printed(capsys):
    bar = LogLines(total=100, desc="train", unit="step", every=3600)
    for _ in range(99):
        bar.update()
    assert capsys.readouterr().err == ""  # nothing until the interval passes ...
    bar.update()
    assert capsys.readouterr().err.startswith("train: 100/100 step")  # ... or the end


def test_probe_in_a_log_file_writes_lines(tmp_path, pair):
    contexts = write_contexts(tmp_path / "c.jsonl")
    log = tmp_path / "probe.log"
    with open(log, "w") as f:  # as under nohup or SLURM: stderr is a file
        rc = subprocess.run([sys.executable, "-m", "teachdiag", "probe", "--teacher", pair[0], "--student", pair[1],
                             "--contexts", str(contexts), "--out", str(tmp_path / "r"), "--device", "cpu"],
                            stderr=f, stdout=subprocess.DEVNULL).returncode
    text = log.read_text()
    assert rc == 0 and "\r" not in text
    assert any(line.startswith("probe: ") and "/" in line and "pos/s" in line for line in text.splitlines())
