"""How far a shared-step run is from this machine's matrix-multiply floor.

    python benchmarks/shared_step_floor.py --run runs/shared_all            # a finished --gain shared run
    python benchmarks/shared_step_floor.py --run runs/shared_all --threads 2

Counts the matrix FLOPs the shared step cannot avoid for the run's contexts and positions
(2·params·tokens per forward; backward = 2× forward; the LM head only at the probed positions):

    teacher forward + student forward + student backward + JVP (≈ forward, tangent half) + re-score forward

measures this machine's float32 matmul rate on the student's own layer shapes (same process, same
threads), and prints floor = FLOPs / rate next to the run's measured probe time. The ratio
floor / measured is the share of the time spent on necessary matrix work; the rest is softmax/KL
arithmetic in float64, attention, data movement and Python.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def body_params(model_dir: Path) -> tuple[int, int, int]:
    """(non-embedding parameters of the blocks, hidden size, vocabulary rows) from config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or d // heads
    attn = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    return layers * (attn + 3 * d * f), d, c["vocab_size"]


def matmul_rate(d: int, f: int, tokens: int = 256, seconds: float = 3.0) -> float:
    """FLOP/s of float32 matmuls shaped like the student's MLP and head (tokens × d × f)."""
    a, w = torch.randn(tokens, d), torch.randn(d, f)
    a @ w
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ w
        n += 1
    return 2 * tokens * d * f * n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished `teachdiag probe --gain shared` run folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = json.loads((Path(args.run) / "run.json").read_text())
    from teachdiag.contexts import load_contexts

    ctxs = load_contexts(run["contexts"]["path"], run["options"]["max_response_tokens"] or None)
    s_body, d_s, v = body_params(Path(run["student"]["path"]))
    t_body, d_t, _ = body_params(Path(run["teacher"]["path"]))
    positions = run["positions"]["probed"]
    s_tokens = sum(len(c.prompt_ids) + len(c.response_ids) - 1 for c in ctxs)
    t_tokens = sum(len(c.teacher_view) + len(c.response_ids) - 1 for c in ctxs)
    fwd_s = 2 * s_body * s_tokens + 2 * d_s * v * positions  # blocks over every token, head at the positions
    fwd_t = 2 * t_body * t_tokens + 2 * d_t * v * positions
    first_order = run["step"].get("first_order", "") != "skipped"
    flops = fwd_t + fwd_s + 2 * fwd_s + (fwd_s if first_order else 0) + fwd_s
    c = json.loads((Path(run["student"]["path"]) / "config.json").read_text())
    rate = min(matmul_rate(c["hidden_size"], c["intermediate_size"]), matmul_rate(c["hidden_size"], v // 8))
    floor = flops / rate
    measured = run["probe_s"]
    print(f"contexts {len(ctxs)}, positions {positions}, student tokens {s_tokens}, teacher tokens {t_tokens}")
    print(f"FLOPs {flops / 1e12:.1f} T (teacher fwd {fwd_t / 1e12:.1f}, student fwd {fwd_s / 1e12:.1f} each; "
          f"first order {'on' if first_order else 'off'})")
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s on {args.threads} threads -> floor {floor / 60:.1f} min")
    print(f"measured probe {measured / 60:.1f} min ({run['positions_per_s']} positions/s); "
          f"floor / measured = {floor / measured:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
