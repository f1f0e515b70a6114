"""Does `teachdiag analyze` stay linear in rows? Time it on synthetic tables of researchers' sizes.

    PYTHONPATH=. python benchmarks/analyze_scale.py --rows 57600,576000                  # this checkout
    PYTHONPATH=. python benchmarks/analyze_scale.py --rows 57600 --base /path/to/other/checkout  # and compare
    PYTHONPATH=. python benchmarks/analyze_scale.py --rows "" --committed --base /path/to/other/checkout

57,600 rows is one Qwen pair's bank (300 rollouts × 192 tokens); 576,000 is ten pairs' worth.
The table is the committed shared-step run (data/demo_shared_tokens.csv.gz, 51,600 positions of
300 contexts, every column filled) tiled: copy c renames each context "<id>~c" and multiplies every
float column by exp(0.01 · N(0, 1)) (seeded), so copies are new contexts with their own ranks and
ties, and the first `rows` rows in table order are kept. Each size is written once to --work and
analysed by `teachdiag analyze` in a subprocess (default protocol, 1,000 resamples): wall and CPU
time, peak RSS and the load average around it. With --base, the same command runs with that
checkout on PYTHONPATH and every CSV, .md and .tex of the two is compared byte for byte (figures
are not: their files carry dates). Exit status 1 when any differs.
OMP_NUM_THREADS defaults to 1 here, as the tests run: set it to compare thread counts.

--committed runs, instead of (or besides) the synthetic sizes, the analyses behind data/'s committed
folders on the committed tables (data/README.md): demo_analysis, demo_compare and demo_instruments,
each with the paper protocol too, demo_viability, and the held-out comparisons rebuilt from
heldout_gains.csv.gz; with --base, every CSV, .md and .tex they write is compared byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pandas as pd

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data/demo_shared_tokens.csv.gz"
# columns that are not measurements: kept as they are in every copy
FIXED = ("context_id", "position", "token_id", "token", "finite", "response_length", "instrument")


def make_table(rows: int, path: pathlib.Path, seed: int = 0) -> None:
    """Write `rows` rows of the tiled, perturbed demo table to `path` (tokens.csv)."""
    from teachdiag.table import read_tokens

    base = read_tokens(SOURCE)
    rng = np.random.default_rng(seed)
    floats = [c for c in base.columns if c not in FIXED and pd.api.types.is_float_dtype(base[c])]
    parts, have, copy = [], 0, 0
    while have < rows:
        part = base.copy()
        part["context_id"] = part["context_id"] + f"~{copy}"
        noise = np.exp(0.01 * rng.standard_normal((len(part), len(floats))))
        part[floats] = part[floats].to_numpy(float) * noise
        parts.append(part)
        have, copy = have + len(part), copy + 1
    table = pd.concat(parts, ignore_index=True).iloc[:rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.17g")


def analyze(table: pathlib.Path, out: pathlib.Path, code: pathlib.Path) -> dict:
    """Run `teachdiag analyze` on `table` with the package from `code`: wall and CPU seconds, peak
    RSS (GB) and the load average (1 min) before and after (the cores may be shared)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load, t0 = os.getloadavg()[0], time.time()
    # run from `code`: `python -m` puts the working directory ahead of PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-m", "teachdiag", "analyze", str(table.parent), "--out", str(out)],
                            env=env, cwd=code, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use
    if status != 0:
        raise SystemExit(f"teachdiag analyze failed on {table} with {code}")
    return {"wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_gb": usage.ru_maxrss / 1e6, "load": (load, os.getloadavg()[0])}


def _say(what: str, r: dict, code: pathlib.Path) -> None:
    print(f"{what}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['rss_gb']:.2f} GB, "
          f"load {r['load'][0]:.1f} → {r['load'][1]:.1f} ({code})", flush=True)


def differing(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """Output files (CSV, gzipped CSV, .md, .tex; figures aside) that differ between two output
    folders, or exist in one only; a .gz is compared decompressed (its header holds a time)."""
    kinds = ("*.csv", "*.csv.gz", "*.md", "*.tex")
    names = sorted({str(p.relative_to(root)) for root in (a, b) for k in kinds for p in root.rglob(k)})

    def content(p: pathlib.Path) -> bytes | None:
        if not p.exists():
            return None
        return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()

    return [n for n in names if content(a / n) is None or content(a / n) != content(b / n)]


def committed_runs(work: pathlib.Path) -> list[tuple[str, list[str]]]:
    """Run folders for the committed tables under work/, and the commands behind data/'s folders:
    (name, argv after `python -m`), {out} standing for the output folder."""
    runs, data = work / "runs", ROOT / "data"
    for name, table, record in (("per_position", "demo_tokens", "demo_run"), ("sgd", "demo_tokens_sgd", "demo_run_sgd"),
                                ("adam", "demo_tokens_adam", "demo_run_adam"),
                                ("shared", "demo_shared_tokens", "demo_shared_run"),
                                ("checkpoint", "demo_checkpoint_tokens", "demo_checkpoint_run")):
        (runs / name).mkdir(parents=True, exist_ok=True)
        for link, target in (("tokens.csv.gz", f"{table}.csv.gz"), ("run.json", f"{record}.json")):
            path = runs / name / link
            if path.is_symlink():  # made by another checkout, maybe gone since: this one's data
                path.unlink()
            if not path.exists():
                path.symlink_to(data / target)
    for name in ("demo_heldout", "demo_heldout_released"):  # one gain_<selector>/ run per selector
        gains = pd.read_csv(data / name / "heldout_gains.csv.gz", dtype={"context_id": str})
        for sel, part in gains.groupby("selector", sort=False):
            csv = runs / name / f"gain_{sel}" / "tokens.csv"
            if not csv.exists():
                csv.parent.mkdir(parents=True, exist_ok=True)
                part.drop(columns="selector").to_csv(csv, index=False, float_format="%.17g")
    lengths = ["--protocol", "paper", "--response-lengths", str(ROOT / "teachdiag/demo/data/demo_rollouts.jsonl")]
    three = [str(runs / r) for r in ("per_position", "sgd", "adam")]
    instruments = [str(runs / r) for r in ("per_position", "shared", "checkpoint")]
    analyze = ["teachdiag", "analyze"]
    return [("demo_analysis", [*analyze, str(runs / "per_position"), "--out", "{out}"]),
            ("demo_compare", [*analyze, *three, "--out", "{out}"]),
            ("demo_compare/paper", [*analyze, *three, "--out", "{out}", *lengths]),
            ("demo_instruments", [*analyze, *instruments, "--out", "{out}"]),
            ("demo_instruments/paper", [*analyze, *instruments, "--out", "{out}", *lengths]),
            ("demo_viability", [*analyze, str(data / "demo_viability"), "--out", "{out}"]),
            ("demo_heldout", ["teachdiag.analysis.heldout", str(runs / "demo_heldout"), "--out", "{out}"]),
            ("demo_heldout_released", ["teachdiag.analysis.heldout", str(runs / "demo_heldout_released"),
                                       "--out", "{out}"])]


def run_committed(work: pathlib.Path, code: pathlib.Path, label: str) -> float:
    """Every committed analysis with the package from `code`, into work/label/<name>; seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    for name, argv in committed_runs(work):
        out = str(work / label / name)
        subprocess.run([sys.executable, "-m", *(a.replace("{out}", out) for a in argv)], env=env, cwd=code,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="57600,576000", help="comma-separated table sizes ('' for none)")
    ap.add_argument("--work", default="/tmp/analyze_scale", help="where tables and outputs go")
    ap.add_argument("--base", default="", help="another checkout: run it too and compare the outputs")
    ap.add_argument("--committed", action="store_true", help="also the analyses of the committed tables")
    args = ap.parse_args(argv)
    work, same = pathlib.Path(args.work).resolve(), True
    for rows in (int(r) for r in args.rows.split(",") if r):
        table = work / f"rows{rows}" / "tokens.csv"
        if not table.exists():
            make_table(rows, table)
        _say(f"{rows} rows", analyze(table, work / f"out{rows}", ROOT), ROOT)
        if args.base:
            base = pathlib.Path(args.base).resolve()
            _say(f"{rows} rows", analyze(table, work / f"base{rows}", base), base)
            diff = differing(work / f"out{rows}", work / f"base{rows}")
            same &= not diff
            print(f"{rows} rows: outputs " + (f"DIFFER: {', '.join(diff)}" if diff else "identical"), flush=True)
    if args.committed:
        secs = run_committed(work / "committed", ROOT, "out")
        print(f"committed tables: {secs:.1f} s ({ROOT})", flush=True)
        if args.base:
            secs = run_committed(work / "committed", pathlib.Path(args.base).resolve(), "base")
            print(f"committed tables: {secs:.1f} s ({args.base})", flush=True)
            diff = differing(work / "committed" / "out", work / "committed" / "base")
            same &= not diff
            print("committed tables: outputs " + (f"DIFFER: {', '.join(diff)}" if diff else "identical"), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
