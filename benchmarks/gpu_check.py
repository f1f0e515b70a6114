"""One prepared GPU check: the CUDA tests, then every instrument at real shapes and on the demo pair.

    bash scripts/gpu_check.sh                                      # CUDA, real shapes -> runs/gpu_check-<time>/
    bash scripts/gpu_check.sh --out "$OUT/gpu_check"               # into a folder of your choice
    bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/dry   # the CPU dry run tests/test_gpu_check.py runs
    bash scripts/gpu_check.sh --only exact,naive --pairs shapes    # some stages again

Stages, each in its own try/except, so a failure is recorded and the rest still run:
  tests        python -m pytest tests/gpu -m gpu (on CPU: the CPU twin of one check, so the stage runs)
then for each pair (`shapes`: random-init Qwen2.5-0.5B student / 1.5B teacher shapes, vocabulary
151,936, gpu_pairs.py, tiny Qwen2 shapes with --tiny; `demo`: the embedded pair on its rollouts):
  build        shapes only: make the pair and save it into --work
  exact        `teachdiag probe` (teachdiag.run_probe): the per-position step on a few hundred positions
  naive        probe_speed.py's naive reference (deep copy per position, torch alone) on the first of
               the same positions, in this process: its positions/s, exact over naive, and the largest
               |gain_rkl difference| from the exact run's tokens.csv
  shared       `teachdiag probe --gain shared`
  linear       `teachdiag probe --mode linear`
  train        `teachdiag train --steps 2` (teachdiag.run_train)
  checkpoint   `teachdiag probe --student-after` train's model (the student itself if train failed)
The teacher runs in bfloat16 (--dtype), the student always in float32. A stage starts only while
the elapsed time is under --budget-s, so the check ends inside a lent GPU's minutes.

Writes to --out: header.json (commit, GPU name, torch/CUDA/transformers versions, date, peaks),
results.jsonl (a line per stage, appended as it ends: a killed check keeps every finished number),
results.csv and summary.json (rewritten after every stage; summary.json adds the issue's targets,
met or not), tests.junit.xml and tests.log, runs/<pair>-<stage>/ (each stage's run folder). Models
and train's checkpoints (GBs at real shapes) go to --work, a temporary folder removed at the end
unless given.

Per stage: positions/s (probe stages: run.json's, probed positions / probe time; train: trained
positions / step time; naive: its own timed loop), peak memory (CUDA: torch.cuda.max_memory_allocated
after reset_peak_memory_stats; CPU: the process's peak RSS so far, which cannot be reset per stage),
model FLOPs and MFU, and the memory model (both in gpu_costs.py, which says how they are counted).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the sibling modules by file, not as a `benchmarks` package, which an installed package could shadow
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import teachdiag  # noqa: E402
import gpu_costs  # noqa: E402
import gpu_pairs  # noqa: E402
from gpu_tests import run_gpu_tests  # noqa: E402
from probe_speed import Clock, bf16_matmul_flops, naive_position  # noqa: E402
from teachdiag.contexts import by_context, load_contexts, select_positions  # noqa: E402
from teachdiag.demo import DEMO_ROLLOUTS, zoo  # noqa: E402
from teachdiag.models import load_model, load_tokenizer  # noqa: E402
from teachdiag.provenance import code_version  # noqa: E402
from teachdiag.training import batches  # noqa: E402

PAIR_STAGES = ("build", "exact", "naive", "shared", "linear", "train", "checkpoint")
# per stage (full check, --tiny): positions ("all": every position of the pair's contexts), contexts
# per train step, and --max-response-tokens (0: whole responses; the tiny demo keeps 16 tokens of each
# so the 135M pair's dry run takes seconds on one CPU thread)
SIZES = {"shapes": {"exact": (256, 12), "naive": (16, 3), "shared": ("all", "all"), "linear": (256, 12),
                    "checkpoint": ("all", "all"), "train_batch": (8, 2), "max_response_tokens": (0, 0)},
         "demo": {"exact": (256, 2), "naive": (16, 1), "shared": (256, 2), "linear": (256, 2),
                  "checkpoint": (256, 2), "train_batch": (8, 1), "max_response_tokens": (0, 16)}}
TRAIN_STEPS = 2
LR = 1e-3  # the normalized rule's default: the exact run and the naive reference take the same step
COLUMNS = ["stage", "pair", "status", "positions", "seconds", "positions_per_s", "speedup_vs_naive",
           "max_abs_gain_diff", "max_abs_gain", "peak_memory_mb", "peak_memory_kind", "memory_model_mb",
           "peak_over_model", "flops", "tflops_per_s", "mfu", "mfu_bf16", "mfu_fp32", "wall_s", "run",
           "note", "error"]


class Check:
    """The check's state: options, where things are, and the results so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device, self.dtype = args, torch.device(args.device), args.dtype
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="teachdiag-gpu-check-"))
        self.size = 1 if args.tiny else 0
        self.pairs: dict[str, tuple[str, str, str]] = {"demo": (zoo.TEACHER, zoo.STUDENT, str(DEMO_ROLLOUTS))}
        self.after: dict[str, str] = {}  # pair -> the model train wrote
        self.results: list[dict] = []
        self.header: dict = {}  # header.json, once written
        self.t0 = time.perf_counter()
        self.peak = gpu_costs.device_peak(torch.cuda.get_device_name(self.device)) if self.cuda else \
            {"match": "cpu", "bf16": None, "fp32": None}

    # ------------------------------------------------------------------ running and recording

    def stage(self, name: str, pair: str, fn) -> None:
        """Run one stage, record what it measured or why it failed, and write every results file."""
        rec = {"stage": name, "pair": pair, "status": "ok"}
        if time.perf_counter() - self.t0 > self.args.budget_s:
            rec.update(status="skipped", note=f"past --budget-s {self.args.budget_s:g} s")
        else:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            t = time.perf_counter()
            try:
                rec.update(fn())
            except Exception as exc:  # a GPU minute is precious: record it and go on to the next stage
                rec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                           traceback=traceback.format_exc()[-6000:])
            rec["wall_s"] = round(time.perf_counter() - t, 3)
            rec.update(self.peak_memory())
            if self.cuda and rec.get("memory_model_mb"):
                rec["peak_over_model"] = rec["peak_memory_mb"] / rec["memory_model_mb"]
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.results.append(rec)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.write_tables()
        pps = rec.get("positions_per_s")
        print(f"gpu_check: {pair} {name}: {rec['status']}" + (f", {pps:.3g} positions/s" if pps else "")
              + (f" ({rec['error'].splitlines()[0][:200]})" if rec.get("error") else ""), flush=True)

    def peak_memory(self) -> dict:
        if self.cuda:
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "peak_memory_kind": "torch.cuda.max_memory_allocated"}
        return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_memory_kind": "peak RSS of the process so far (CPU; not reset per stage)"}

    def write_tables(self) -> None:
        with open(self.out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.results)
        summary = {"header": self.header, "elapsed_s": round(time.perf_counter() - self.t0, 3),
                   "targets": gpu_costs.verdicts(self.results, self.cuda), "stages": self.results}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def measure(self, stage: str, pair: str, positions: int, seconds: float, picks) -> dict:
        """positions/s, model FLOPs and MFU, and the memory model of a stage that did `picks`."""
        teacher, student, _ = self.pairs[pair]
        t, s = zoo.resolve(teacher), zoo.resolve(student)  # the demo's short names -> their folders
        ctxs = {ctx.id: ctx for ctx in self.contexts(pair)}
        f_t, f_s = gpu_costs.stage_flops(stage, gpu_costs.Shape.of(t), gpu_costs.Shape.of(s), ctxs, picks)
        return {"positions": positions, "seconds": seconds, "positions_per_s": positions / seconds,
                **gpu_costs.mfu(f_t, f_s, seconds, self.peak, self.dtype),
                "memory_model_mb": gpu_costs.memory_model(stage, t, s, self.dtype) / 2**20}

    def contexts(self, pair: str) -> list:
        """The pair's contexts as the stages' runs read them (truncated alike)."""
        return load_contexts(self.pairs[pair][2], SIZES[pair]["max_response_tokens"][self.size] or None)

    def common(self, pair: str) -> dict:
        """Options every run of the pair takes: the models, the contexts, where, the teacher's dtype."""
        t, s, c = self.pairs[pair]
        return dict(teacher=t, student=s, contexts=c, dtype=self.dtype, device=str(self.device),
                    max_response_tokens=SIZES[pair]["max_response_tokens"][self.size])

    # ------------------------------------------------------------------ stages

    def tests(self) -> dict:
        left = self.args.budget_s - (time.perf_counter() - self.t0)
        return run_gpu_tests(self.out, self.cuda, timeout=max(10.0, min(self.args.tests_timeout_s, left)))

    def build(self) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar, twice, in a log
        shape = gpu_pairs.SHAPES["tiny" if self.args.tiny else "real"]
        self.pairs["shapes"] = gpu_pairs.build_pair(self.work / "shapes", shape, str(self.device))
        return {"note": f"{'tiny' if self.args.tiny else 'Qwen2.5-0.5B / 1.5B'} shapes in {self.work / 'shapes'}"}

    def probe(self, pair: str, stage: str) -> dict:
        """One `teachdiag probe` run: the exact, shared, linear or checkpoint instrument."""
        extra, note = {}, ""
        if stage == "shared":
            extra = {"gain": "shared"}
        elif stage == "linear":
            extra = {"mode": "linear"}
        elif stage == "checkpoint":
            extra = {"student_after": self.after.get(pair, self.pairs[pair][1])}
            note = "" if pair in self.after else "train wrote no model: θτ = θ0 (timing only, gains 0)"
        run_dir = self.out / "runs" / f"{pair}-{stage}"
        run = teachdiag.run_probe(**self.common(pair), positions=str(SIZES[pair][stage][self.size]), lr=str(LR),
                                  out=str(run_dir), overwrite=True, **extra)
        picks = [(cid, list(g["position"])) for cid, g in run.table.groupby("context_id", sort=False)]
        n, pps = run.record["positions"]["probed"], run.record["positions_per_s"]
        # probe time from run.json's rate, whose digits outlast probe_s's millisecond rounding on tiny runs
        return {**self.measure(stage, pair, n, n / pps, picks), "run": str(run_dir), "note": note,
                "probe": run.record["step"]["probe"], "finite_rows": int(run.table["finite"].sum())}

    def naive(self, pair: str) -> dict:
        """The naive reference on the first positions of the exact stage's sample, timed in this process."""
        t, s, _ = self.pairs[pair]
        ctxs = self.contexts(pair)
        picks = select_positions(ctxs, int(SIZES[pair]["exact"][self.size]), seed=0)[: SIZES[pair]["naive"][self.size]]
        vocab = len(load_tokenizer(s))
        teacher = load_model(t, "teacher", self.dtype, self.device)
        student = load_model(s, "student", "float32", self.device)
        step = lambda c_, j: naive_position(student, teacher, ctxs[c_], j, vocab, LR, "normalized", "all",  # noqa: E731
                                            self.device)
        step(*picks[0])  # warm-up: lazy initialisation belongs to neither side
        with Clock(self.device) as clock:
            gains = [step(c_, j) for c_, j in picks]
        rec = self.measure("naive", pair, len(picks), clock.s,
                           [(ctxs[c_].id, js) for c_, js in by_context(picks).items()])
        exact_csv = self.out / "runs" / f"{pair}-exact" / "tokens.csv"
        exact = next((r for r in self.results if (r["stage"], r["pair"], r["status"]) == ("exact", pair, "ok")), None)
        if exact and exact_csv.is_file():
            table = teachdiag.load_run(exact_csv.parent).table.set_index(["context_id", "position"])
            ours = [table.loc[(ctxs[c_].id, j), "gain_rkl"] for c_, j in picks]
            rec.update(speedup_vs_naive=exact["positions_per_s"] / rec["positions_per_s"],
                       max_abs_gain_diff=max(abs(a - b) for a, b in zip(gains, ours)),
                       max_abs_gain=max(abs(g) for g in gains))
        else:
            rec["note"] = "no exact run to compare with"
        rec["gains"] = gains
        return rec

    def train(self, pair: str) -> dict:
        out = self.work / f"{pair}-train"
        batch = SIZES[pair]["train_batch"][self.size]
        teachdiag.run_train(**self.common(pair), out=str(out), steps=TRAIN_STEPS, batch=batch, overwrite=True)
        self.after[pair] = str(out / "model")
        record = self.out / "runs" / f"{pair}-train"
        record.mkdir(parents=True, exist_ok=True)
        for name in ("train_log.csv", "train.json"):  # the small files; the model stays in --work
            shutil.copy(out / name, record / name)
        log = pd.read_csv(out / "train_log.csv")
        ctxs = self.contexts(pair)
        plan = batches(len(ctxs), min(batch, len(ctxs)), TRAIN_STEPS, seed=0)  # as run_train draws them
        picks = [(ctxs[i].id, list(range(len(ctxs[i].response_ids)))) for step in plan for i in step]
        return {**self.measure("train", pair, int(log["positions"].sum()), float(log["seconds"].sum()), picks),
                "run": str(record), "note": "seconds: the steps' own, model saving excluded"}


def header(check: Check, argv: list[str]) -> dict:
    """run.json's opening, for the check: which code, which machine, which versions, when."""
    import transformers

    rate = None
    if check.cuda:  # a measured matmul rate beside the table's peak (about a second)
        try:
            rate = bf16_matmul_flops(check.device) / 1e12
        except Exception as exc:  # noqa: BLE001 (a header field is not worth the check)
            rate = f"failed: {exc}"
    return {"check": "benchmarks/gpu_check.py", "argv": argv, "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "commit": code_version()["git_commit"] or os.environ.get("TEACHDIAG_COMMIT"),
        "teachdiag": teachdiag.__version__, "device": str(check.device),
        "device_name": torch.cuda.get_device_name(check.device) if check.cuda else
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "peak_flops": check.peak, "measured_bf16_matmul_tflops": rate,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if check.cuda else None, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tiny": check.args.tiny, "teacher_dtype": check.dtype, "work": str(check.work),
        "shapes": gpu_pairs.SHAPES["tiny" if check.args.tiny else "real"],
        "positions": {p: {k: v[check.size] for k, v in sizes.items()} for p, sizes in SIZES.items()}}


def main(argv: list[str] | None = None) -> dict:
    """Run the check; returns summary.json's contents."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run) [default: cuda]")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and few positions (the dry run)")
    ap.add_argument("--out", default="", help="results folder [default: runs/gpu_check-<date-time>]")
    ap.add_argument("--work", default="", help="folder for models and checkpoints [default: a temporary one, "
                    "removed at the end]")
    ap.add_argument("--pairs", default="shapes,demo", help="pairs to run, of shapes, demo [default: shapes,demo]")
    ap.add_argument("--only", default="", help="comma-separated stages to run (tests, exact, naive, shared, "
                    "linear, train, checkpoint) [default: all]")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="teacher dtype")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no stage after this many seconds "
                    "[default: 420, so the check ends within ~8 minutes]")
    ap.add_argument("--tests-timeout-s", type=float, default=150.0, help="kill tests/gpu after this long")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no GPU (the dry run is --device cpu --tiny)")
    pairs = [p for p in args.pairs.split(",") if p]
    only = set(args.only.split(",")) - {""} if args.only else {"tests", *PAIR_STAGES}
    if not set(pairs) <= set(SIZES) or not only <= {"tests", *PAIR_STAGES}:
        ap.error(f"--pairs of {', '.join(SIZES)}; --only of tests, {', '.join(PAIR_STAGES)}")
    args.out = args.out or f"runs/gpu_check-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check = Check(args)
    check.out.mkdir(parents=True, exist_ok=True)
    (check.out / "results.jsonl").unlink(missing_ok=True)
    check.header = header(check, argv)
    (check.out / "header.json").write_text(json.dumps(check.header, indent=2) + "\n")
    try:
        if "tests" in only:
            check.stage("tests", "-", check.tests)
        for pair in pairs:
            if pair == "shapes":  # every shapes stage needs the models (a given --work keeps them)
                check.stage("build", pair, check.build)
            for name in PAIR_STAGES[1:]:
                if name in only:
                    fn = {"naive": check.naive, "train": check.train}.get(name)
                    check.stage(name, pair, (lambda fn=fn, p=pair: fn(p)) if fn else
                                (lambda n=name, p=pair: check.probe(p, n)))
    finally:
        if not args.work:
            shutil.rmtree(check.work, ignore_errors=True)
    check.write_tables()
    print(f"gpu_check: wrote {check.out}/summary.json, results.csv, results.jsonl", flush=True)
    return json.loads((check.out / "summary.json").read_text())


if __name__ == "__main__":
    main()
