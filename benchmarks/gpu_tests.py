"""The GPU check's first stage: tests/gpu under pytest, killed whole at a timeout, summarised from junit.

    from gpu_tests import run_gpu_tests      # benchmarks/ on sys.path, as gpu_check.py puts it
    rec = run_gpu_tests(Path("out"), cuda=True, timeout=150)   # {"passed", "failures", "failed", ...}

On CUDA it runs the cases marked `gpu` (their CPU twins run in the ordinary suite); on a CPU, for
the dry run, the CPU twin of one check, so this stage's own code runs too. Output goes to
tests.log and tests.junit.xml in the given folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_tests(out: Path, cuda: bool, timeout: float) -> dict:
    """The stage's record; status "error" when pytest fails or no test passed."""
    junit = out / "tests.junit.xml"
    junit.unlink(missing_ok=True)  # a report left by an earlier check must not pass for this one's
    select = ["-m", "gpu"] if cuda else ["-k", "theta0 and cpu and llama_pair"]
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", *select]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(out / "tests.log", "w") as log:
        # its own process group, so a timeout also kills what the tests started (torchrun's workers)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"tests/gpu did not finish in {timeout:.0f} s (see tests.log)") from None
    if not junit.is_file():  # pytest never got to the tests (not installed, a conftest import failed)
        tail = (out / "tests.log").read_text()[-1500:]
        raise RuntimeError(f"pytest exit {code} and no junit report; tests.log ends: {tail}")
    root = ET.parse(junit).getroot()
    counts = {k: sum(int(s.get(k, 0)) for s in root.iter("testsuite")) for k in ("tests", "failures", "errors",
                                                                                  "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rec = {"command": " ".join(cmd[1:]), "returncode": code, "passed": passed, **counts, "failed": failed,
           "note": f"{passed} passed, {len(failed)} failed, {counts['skipped']} skipped"}
    if code != 0 or passed == 0:
        rec.update(status="error", error=f"pytest exit {code}: {rec['note']}; see tests.log")
    return rec
