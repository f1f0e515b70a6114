"""Peak RSS and disk of `teachdiag train --batch 8` on a random-init Qwen2.5-0.5B/1.5B-shaped pair, codes side by side.

    git archive 9337537 teachdiag | tar -x -C /tmp/before                      # the code before, to compare
    python benchmarks/train_memory.py --code /tmp/before --code . --layers 4   # scaled depth, same vocab/hidden
    python benchmarks/train_memory.py --code /tmp/before --code .              # real depth (needs ~16 GB free)

The pair is gpu_pairs.py's (student float32, teacher saved in bf16, vocabulary 151,936, tied
embeddings, 8 contexts of 64 + 192 tokens), built once into --work; --layers N cuts both models to
N layers, keeping every width and the vocabulary, so the (R, V) logits are the real size and only
the weights shrink. Each --code is a teachdiag checkout whose folder goes first on PYTHONPATH; each
runs, one after the other, in its own child process:

    teachdiag train --batch 8 --steps S --dtype bfloat16 [--save-every E where the code has it] ...

Recorded per run: the child's peak RSS (getrusage of that process itself, at its end: the whole
run, steps and saves), its largest anonymous and file-backed resident sets (read by a thread of
the child every 10 ms), its wall time, and the largest size of --out (polled by this process
every 0.1 s: a set written beside the last shows as two). Read peak_anon_mb first: the weights
from_pretrained maps from safetensors are file pages, counted in RSS while resident, and when the
kernel drops and maps them back varies from run to run (it moved one code's peak RSS by 1.1 GB). Steps 2 and on hold AdamW's moments, so
a run needs --steps 2 or more to show the steady state. Other jobs share the machine: a watchdog
kills a run when the machine's available memory falls under --min-free-gb, and records that.
Prints one JSON line per run and writes them to --work/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pairs import SHAPES, build_pair  # noqa: E402

# the child: teachdiag's own CLI in this process; a thread reads its anonymous and file-backed
# resident sets every 10 ms (a context's float64 temporaries live for a fraction of a second);
# at the end, those peaks and the kernel's own peak RSS (ru_maxrss, kB on Linux)
CHILD = """
import json, resource, sys, threading, time
peak = {"RssAnon": 0, "RssFile": 0}
def watch():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
t0 = time.time()
import teachdiag
from teachdiag.cli import main
rc = main(sys.argv[2:])
json.dump({"rc": rc, "teachdiag": teachdiag.__file__, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "peak_anon_mb": round(peak["RssAnon"] / 1024), "peak_file_mb": round(peak["RssFile"] / 1024),
           "seconds": round(time.time() - t0, 1)}, open(sys.argv[1], "w"))
"""


def folder_bytes(folder: Path) -> int:
    """Bytes allocated under `folder` (files being written and deleted under it: errors skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_one(code: Path, pair: tuple[str, str, str], out: Path, args) -> dict:
    """One `teachdiag train` of `code` in a child process, watched: peak RSS, seconds, peak --out size."""
    has_save_every = "save_every" in (code / "teachdiag" / "commands" / "train.py").read_text()
    teacher, student, contexts = pair
    options = ["--steps", str(args.steps), "--batch", "8", "--dtype", "bfloat16", "--loss", args.loss,
               "--select", args.select, "--device", "cpu", "--threads", str(args.threads)]
    if has_save_every and args.save_every is not None:
        options += ["--save-every", str(args.save_every)]
    argv = ["train", "--teacher", teacher, "--student", student, "--contexts", contexts, "--out", str(out),
            *options, "--quiet", "--overwrite"]
    result_file = out.with_name(out.name + ".result.json")
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(code.resolve()), OMP_NUM_THREADS=str(args.threads))
    # cwd: `python -c` puts the current folder first on sys.path, before PYTHONPATH, so a run started
    # in a checkout would import that checkout's teachdiag whatever --code says
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(result_file), *argv], env=env, cwd=code.resolve(),
                             start_new_session=True)  # its own group, so the watchdog can stop all of it
    peak_disk, low_memory = 0, None
    while child.poll() is None:
        peak_disk = max(peak_disk, folder_bytes(out))
        if available_gb() < args.min_free_gb:
            low_memory = available_gb()
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(0.1)
    row = {"code": str(code), "options": " ".join(options), "shape": args.shape_name,
           "peak_out_mb": round(peak_disk / 1e6, 1), "final_out_mb": round(folder_bytes(out) / 1e6, 1)}
    if low_memory is not None:
        row["killed"] = f"machine's available memory fell to {low_memory:.1f} GB (< --min-free-gb)"
    elif result_file.is_file():
        row.update(json.loads(result_file.read_text()))
    else:
        row["rc"] = child.returncode
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", action="append", required=True, help="a teachdiag checkout (repeat: run in order)")
    ap.add_argument("--work", default="/tmp/train_memory", help="pair and run folders (GBs)")
    ap.add_argument("--layers", type=int, default=0, help="layers of each model (0: the real 24 / 28)")
    ap.add_argument("--tiny", action="store_true", help="gpu_pairs' tiny shapes: a dry run of this script")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=None, help="passed to codes that have the option")
    ap.add_argument("--loss", default="sampled_token")
    ap.add_argument("--select", default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-free-gb", type=float, default=1.5)
    args = ap.parse_args(argv)
    shape = json.loads(json.dumps(SHAPES["tiny" if args.tiny else "real"]))
    if args.layers:
        for name in ("student", "teacher"):
            shape[name]["num_hidden_layers"] = args.layers
    args.shape_name = "tiny" if args.tiny else f"{args.layers} layers" if args.layers else "real"
    work = Path(args.work).resolve()  # the children run in their code folder
    pair = build_pair(work / f"pair-{args.shape_name.replace(' ', '')}", shape, "cpu")
    with open(work / "results.jsonl", "a") as f:
        for i, code in enumerate(args.code):
            row = run_one(Path(code), pair, work / f"run{i}", args)
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
