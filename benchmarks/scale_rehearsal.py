"""Rehearse every instrument at the shapes researchers run, on this CPU: peak RSS, temporary disk, s/position.

    python benchmarks/scale_rehearsal.py --instrument shared --contexts 2 4        # the shared step's acceptance
    python benchmarks/scale_rehearsal.py --instrument per_position --positions 2   # ~25 s a position at 0.5B
    python benchmarks/scale_rehearsal.py --instrument checkpoint linear --positions 16
    python benchmarks/scale_rehearsal.py --predict                                 # the memory model only
    python benchmarks/scale_rehearsal.py --pair tiny --instrument shared           # seconds: a smoke test
    python benchmarks/scale_rehearsal.py --pair demo --contexts 4 --against /path/to/old/checkout
                      # the embedded pair, this checkout and another side by side: max |Δ| of every gain

The pair (gpu_pairs.py, built once into --work): random-init Qwen2.5-0.5B student (float32) and
Qwen2.5-1.5B teacher (saved and run in bfloat16), 151,936 output rows, a 151,665-id tokenizer,
contexts of 64-token prompts and 192-token responses. Weights are random: memory and speed do not
depend on them. Each measurement is one `teachdiag probe` subprocess on the first N contexts:
  peak RSS     os.wait4's ru_maxrss of that process
  temp disk    the most its run folder held at once (files polled every 0.2 s, including unlinked
               files the process still holds open, which `du` cannot see), minus what it holds at the end
  s/position   run.json's probe time over probed positions (model loading not counted)
Each result is printed beside memory_model()'s prediction and appended to --log (JSON lines).
--pair demo runs the embedded pair (smollm2-135m / -pruned, float32) on the demo rollouts instead.

The memory model (bytes; N_s, N_t parameters, V vocabulary, P probed positions of a context, T its
tokens) is the weights and the per-context tensors each instrument holds at its peak:
  shared        base + 2·N_t + max(pass 1: 8·N_s + A_recompute(T) + 2·4PV + 2PV,
                                    pass 2: 8·N_s + 4·V·d_s + 2·A_eval(T) + 4·4PV + 2PV) + C
  per_position  base + 2·N_t + 8·N_s + 4·V·d_s + A_train(T) + 4PV + C         (one position per backward)
  checkpoint    base + 2·N_t + 8·N_s + A_eval(T) + 3·4PV + C
  linear        base + 2·N_t + 4·N_s + 2·B·A_train(T) + 4PV + C              (B = --batch positions)
with 4·V·d_s the tied embedding's gradient made before it is added (the shared step's gradient pass
adds it in place, probe/fused.py; its pass 2 holds that module's θ0 copy while its stepped forward
runs, steps.stepped), A_train(T) = 4·T·layers·(7d + 4kv + 4f) the activations a backward keeps,
A_recompute(T) = 4·T·layers·d + A_train(T)/layers those it keeps with the layers recomputed (the
shared step's gradient pass, probe/recompute.py), A_eval(T) = 4·T·(2d + 2f) a forward's working
set, C the float64 chunk of probe/signals.py (at most CHUNK_BYTES), 2PV the bfloat16 teacher's
logits, and base the process's own (torch, transformers: measured on the tiny pair). The 2·N_t is
the bfloat16 teacher. On a GPU the same terms hold with base ≈ the CUDA context.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # gpu_pairs beside this file, this checkout's teachdiag

from gpu_pairs import SHAPES, build_pair  # noqa: E402
from teachdiag.probe.signals import CHUNK_BYTES as CHUNK, LIVE  # noqa: E402  one chunk's float64 temporaries

BASE = 0.535e9  # peak RSS of a `teachdiag probe` on the tiny pair (torch, transformers, the CLI), 2026-12-03
FLAGS = {"shared": ["--gain", "shared"], "per_position": [], "checkpoint": ["--student-after", "{after}"],
         "linear": ["--mode", "linear"]}


@dataclass
class Arch:
    """What the memory model needs of a model: parameters and the shapes of one block."""

    n: int  # parameters (a tied head counted once)
    d: int
    layers: int
    f: int  # MLP width
    kv: int  # key/value width (kv heads × head dim)
    rows: int  # output rows

    @classmethod
    def of(cls, c: dict) -> "Arch":
        d, f, layers, rows = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        hd = c.get("head_dim") or d // heads
        bias = c.get("model_type") == "qwen2"  # Qwen2's q, k, v have biases
        block = 2 * d * heads * hd + 2 * d * kv_heads * hd + 3 * d * f + 2 * d + bias * (heads + 2 * kv_heads) * hd
        n = rows * d * (1 if c.get("tie_word_embeddings") else 2) + layers * block + d
        return cls(n, d, layers, f, kv_heads * hd, rows)

    def act_train(self, tokens: int) -> float:
        return 4.0 * tokens * self.layers * (7 * self.d + 4 * self.kv + 4 * self.f)

    def act_recompute(self, tokens: int) -> float:
        """A backward's activations with the layers recomputed (probe/recompute.py): every layer's
        input, and one layer's own activations at a time."""
        return 4.0 * tokens * self.layers * self.d + self.act_train(tokens) / self.layers

    def act_eval(self, tokens: int) -> float:
        return 4.0 * tokens * (2 * self.d + 2 * self.f)


def qwen(d: int, layers: int, f: int, heads: int, kv_heads: int, tied: bool, head_dim: int | None = None,
         kind: str = "qwen3") -> Arch:
    return Arch.of({"hidden_size": d, "num_hidden_layers": layers, "intermediate_size": f, "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": 151_936,
                    "tie_word_embeddings": tied, "model_type": kind})


PAIRS = {  # (student, teacher) for the predictions
    "Qwen2.5-0.5B / 1.5B": (qwen(896, 24, 4864, 14, 2, True, kind="qwen2"), qwen(1536, 28, 8960, 12, 2, True, kind="qwen2")),
    "Qwen3-1.7B / 8B": (qwen(2048, 28, 6144, 16, 8, True, 128), qwen(4096, 36, 12288, 32, 8, False, 128)),
    "Qwen3-4B / 8B": (qwen(2560, 36, 9728, 32, 8, True, 128), qwen(4096, 36, 12288, 32, 8, False, 128)),
}


def memory_model(instrument: str, s: Arch, t: Arch, vocab: int, positions: int, tokens: int, base: float = BASE,
                 batch: int = 16, teacher_bytes: int = 2) -> float:
    """Predicted peak bytes of one `teachdiag probe` (module docstring); teacher_bytes 2: bfloat16."""
    pv = 4.0 * positions * vocab  # one (P, V) float32 tensor
    grad_emb = 4.0 * s.rows * s.d
    if instrument == "shared":
        t_pv = teacher_bytes / 4 * pv  # the teacher's (P, V) logits, kept in its own dtype
        student = max(8 * s.n + s.act_recompute(tokens) + 2 * pv + t_pv, 8 * s.n + grad_emb + 2 * s.act_eval(tokens) + 4 * pv + t_pv)
    elif instrument == "per_position":
        student = 8 * s.n + grad_emb + s.act_train(tokens) + pv  # θ1 module by module (steps.stepped), as shared
    elif instrument == "checkpoint":
        student = 8 * s.n + s.act_eval(tokens) + 3 * pv
    elif instrument == "linear":  # no step, no θ0 copy; the outputs' gradients held beside the activations
        student = 4 * s.n + 2 * batch * s.act_train(tokens) + pv
    else:
        raise ValueError(instrument)
    return base + teacher_bytes * t.n + student + min(CHUNK, LIVE * 8.0 * vocab * positions)


def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024.0
    return float("nan")


def folder_bytes(folder: Path, pid: int) -> int:
    """Bytes the run folder holds now: its files, and deleted files the process keeps open in it
    (each file once: numpy's fromfile opens a second descriptor on the same file)."""
    seen: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
                seen[st.st_dev, st.st_ino] = st.st_blocks * 512
            except OSError:
                pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(folder)) and target.endswith("(deleted)"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                seen[st.st_dev, st.st_ino] = st.st_blocks * 512
    except OSError:
        pass
    return sum(seen.values())


def measure(work: Path, pair: tuple[str, str, str], instrument: str, n_contexts: int, positions: str, threads: int,
            code: Path, batch: int, vocab: int, dtype: str) -> dict:
    """One `teachdiag probe` subprocess: peak RSS, peak/final disk of its folder, s/position."""
    teacher, student, contexts = pair
    lines = Path(contexts).read_text().splitlines()[:n_contexts]
    ctx = work / f"contexts_{n_contexts}.jsonl"
    ctx.write_text("\n".join(lines) + "\n")
    out = work / "runs" / f"{instrument}-{n_contexts}-{positions}-{code.resolve().name}"
    flags = [f.format(after=str(work / "student_after")) for f in FLAGS[instrument]]
    cmd = [sys.executable, "-m", "teachdiag", "probe", "--teacher", teacher, "--student", student, "--contexts",
           str(ctx), "--out", str(out), "--overwrite", "--device", "cpu", "--threads",
           str(threads), "--quiet", "--positions", positions, "--batch", str(batch), "--dtype", dtype, *flags]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=code)  # `python -m` puts the cwd first on sys.path
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(out, proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    run = json.loads((out / "run.json").read_text())
    probed = run["positions"]["probed"]
    final = folder_bytes(out, 0)
    s_cfg, t_cfg = (json.loads((Path(run[who]["path"]) / "config.json").read_text()) for who in ("student", "teacher"))
    s_arch, t_arch = Arch.of(s_cfg), Arch.of(t_cfg)
    per_ctx = max(len(json.loads(x)["response_ids"]) for x in lines)
    p_ctx = per_ctx if positions == "all" else min(per_ctx, int(positions))
    tokens = max(len(json.loads(x)["prompt_ids"]) for x in lines) + per_ctx
    model = memory_model(instrument, s_arch, t_arch, vocab, p_ctx, tokens, batch=batch,
                         teacher_bytes=2 if dtype == "bfloat16" else 4)
    return {"date": date.today().isoformat(), "out": str(out), "instrument": instrument, "contexts": n_contexts, "positions": probed,
            "threads": threads, "code": str(code), "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "model_gb": model / 1e9, "model_over_measured": model / (usage.ru_maxrss * 1024),
            "peak_disk_gb": peak[0] / 1e9, "final_disk_gb": final / 1e9, "temp_disk_gb": (peak[0] - final) / 1e9,
            "probe_s": run["probe_s"], "s_per_position": run["probe_s"] / probed, "wall_s": time.time() - t0,
            "n_student": s_arch.n, "n_teacher": t_arch.n, "vocab": vocab}


def max_differences(a: Path, b: Path) -> dict:
    """max |a − b| of the measured columns of two runs' tokens.csv (same contexts, same positions)."""
    import pandas as pd

    x, y = (pd.read_csv(p / "tokens.csv").sort_values(["context_id", "position"]).reset_index(drop=True) for p in (a, b))
    assert (x[["context_id", "position"]] == y[["context_id", "position"]]).all().all()
    cols = ["gain_fkl", "gain_rkl", "gain_first_order", "fkl_after", "rkl_after", "fkl", "grad_norm"]
    out = {c: float((x[c] - y[c]).abs().max()) for c in cols}
    out["max_abs_gain_fkl"] = float(x["gain_fkl"].abs().max())
    return out


def predictions(batch: int = 1) -> list[str]:
    """Each instrument's predicted peak for the pairs of PAIRS, all positions of a 64 + 192-token
    context (linear: `batch` positions per backward), teacher in bfloat16."""
    lines = ["| pair | " + " | ".join(FLAGS).replace("linear", f"linear (--batch {batch})") + " |",
             "| --- |" + " --- |" * len(FLAGS)]
    for name, (s, t) in PAIRS.items():
        cells = [f"{memory_model(k, s, t, 151_665, 192, 256, batch=batch) / 1e9:.1f} GB" for k in FLAGS]
        lines.append(f"| {name} (N_s {s.n / 1e9:.2f}B, N_t {t.n / 1e9:.2f}B) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instrument", nargs="+", default=["shared"], choices=list(FLAGS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[2, 4], help="first N contexts, one run each")
    ap.add_argument("--positions", default="all", help="'all' or N sampled over the contexts")
    ap.add_argument("--batch", type=int, default=2, help="--mode linear's positions per batch (its default 16 "
                                                         "needs ~27 GB at 0.5B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair", default="real", choices=[*SHAPES, "demo"])
    ap.add_argument("--work", default="/tmp/scale_rehearsal", help="models and runs (GBs at real shapes)")
    ap.add_argument("--code", default=str(ROOT), help="the teachdiag checkout to measure (its PYTHONPATH)")
    ap.add_argument("--against", default="", help="another checkout run on the same work, compared row by row")
    ap.add_argument("--min-free-gb", type=float, default=14.0, help="refuse to start with less memory available")
    ap.add_argument("--log", default="", help="append each result as a JSON line here")
    ap.add_argument("--predict", action="store_true", help="print the memory model's predictions only")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess that builds
    args = ap.parse_args(argv)
    work = Path(args.work) / args.pair
    shape = dict(SHAPES.get(args.pair, SHAPES["tiny"]), contexts=max(8, *args.contexts))
    if args.pair == "real":
        shape.update(prompt=64, response=192)
    if args.build_only:  # in its own process: initialising the teacher in float32 takes ~9 GB, given back at exit
        build_pair(work, shape, "cpu")
        return 0
    if not args.predict:
        free = mem_available() / 1e9
        if args.pair == "real" and free < args.min_free_gb:
            raise SystemExit(f"only {free:.1f} GB available; the real pair needs {args.min_free_gb:.0f} (--min-free-gb)")
        if args.pair == "demo":
            from teachdiag.demo import DEMO_ROLLOUTS

            work.mkdir(parents=True, exist_ok=True)
            pair, vocab, dtype = ("smollm2-135m", "smollm2-135m-pruned", str(DEMO_ROLLOUTS)), 49_152, "float32"
        else:
            subprocess.run([sys.executable, __file__, "--build-only", "--pair", args.pair, "--work", args.work,
                            "--contexts", *map(str, args.contexts)], check=True)
            pair = build_pair(work, shape, "cpu")  # built: only the paths
            vocab, dtype = shape["tokens"], "bfloat16"
        if "checkpoint" in args.instrument and not (work / "student_after").exists():
            import shutil

            from teachdiag.demo.zoo import resolve

            shutil.copytree(resolve(pair[1]), work / "student_after")  # the same weights: memory and time do not care
        for instrument in args.instrument:
            for n in args.contexts:
                r = measure(work, pair, instrument, n, args.positions, args.threads, Path(args.code), args.batch,
                            vocab, dtype)
                if args.against:
                    old = measure(work, pair, instrument, n, args.positions, args.threads, Path(args.against),
                                  args.batch, vocab, dtype)
                    r["against"] = {k: old[k] for k in ("code", "peak_rss_gb", "temp_disk_gb", "s_per_position")}
                    r["max_abs_difference"] = max_differences(Path(r["out"]), Path(old["out"]))
                print(json.dumps(r))
                if args.log:
                    with open(args.log, "a") as f:
                        f.write(json.dumps(r) + "\n")
    print("\n".join(predictions(args.batch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
