"""Probe speed: teachdiag's probes against a naive reference, same contexts, same process.

    python benchmarks/probe_speed.py                                  # tiny random pair, exact, CPU
    python benchmarks/probe_speed.py --mode lm_head --pair tiny       # lm_head closed form
    python benchmarks/probe_speed.py --mode linear --positions 64     # first-order mode vs exact
    python benchmarks/probe_speed.py --pair embedded --positions 6    # SmolLM2-135M / its pruned student
    python benchmarks/probe_speed.py --pair qwen2.5 --device cuda --dtype bfloat16 --positions 64
                                         # random-init Qwen2.5-0.5B student / 1.5B teacher, 256-token responses

The naive reference does what the definition says, from torch alone (no teachdiag step, loss or
parameter code): for every position, deep-copy the student, run the teacher on that position's
prefix, forward + backward the copy on the full prefix, step with torch.optim (or by hand for the
normalized rule), forward again. teachdiag runs the teacher once per context and, by mode:
  exact    (--params all)  steps and restores in place, one position at a time;
  lm_head / last:N         runs the bottom of the student once per context (probe/fast.py);
  linear                   no step at all: batched first-order gains lr·⟨g, d⟩ (probe/linear.py),
                           compared with the exact probe (Spearman) as well as timed.
Prints positions/s of both, the ratio, the largest |gain difference| (the fast path must compute
the same numbers), peak memory and, on CUDA, model-FLOP utilisation: the floor of one forward +
backward + forward of the student over each prefix (8·N·L FLOPs) against a measured bf16 matmul
rate. Timings belong in benchmarks/RESULTS.md, never in tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from teachdiag.contexts import Context, by_context, load_contexts, select_positions  # noqa: E402
from teachdiag.demo import DEMO_ROLLOUTS  # noqa: E402
from teachdiag.models import load_model, load_tokenizer  # noqa: E402
from teachdiag.probe.instruments import make_instrument  # noqa: E402
from teachdiag.probe.forward import teacher_logits  # noqa: E402


# ---------------------------------------------------------------- the naive reference
# Written from torch alone, on purpose: none of teachdiag's parameter selection, step rules or
# losses, so a wrong step in teachdiag shows up as a gain difference instead of cancelling out.

def naive_params(model, params: str) -> list[torch.nn.Parameter]:
    """The stepped parameters, spelled out for Llama/Qwen layouts (model.model.layers, .norm)."""
    head = model.get_output_embeddings().weight
    if params == "all":
        return list(model.parameters())  # shared (tied) parameters are listed once
    if params == "lm_head":
        return [head]
    n = int(params.split(":")[1])  # last:N
    chosen = [p for layer in model.model.layers[-n:] for p in layer.parameters()]
    chosen += list(model.model.norm.parameters()) + [head]
    return list({id(p): p for p in chosen}.values())


def naive_rkl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p_S ‖ p_T) of two (V,) logit vectors, in float64, by explicit log_softmax."""
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    return (ls.exp() * (ls - lt)).sum()


def naive_position(student, teacher, ctx: Context, j: int, vocab: int, lr: float, optimizer: str,
                   params: str, device: torch.device) -> float:
    """gain_rkl at position j: deep copy, per-position teacher forward, full-prefix forwards,
    torch.optim.SGD / torch.optim.Adam (its first step is bias-corrected: lr·g/(|g|+eps)) or a
    hand-written normalized step θ − lr·g/‖g‖."""
    model = copy.deepcopy(student)
    chosen = naive_params(model, params)
    s_ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[:j], device=device)[None]
    t_ids = torch.tensor(ctx.teacher_view + ctx.response_ids[:j], device=device)[None]
    with torch.no_grad():
        t = teacher(input_ids=t_ids).logits[0, -1, :vocab].float()
    for p in chosen:
        p.requires_grad_(True)
    s = model(input_ids=s_ids).logits[0, -1, :vocab].float()
    loss = naive_rkl(s, t)
    loss.backward()
    if optimizer == "sgd":
        torch.optim.SGD(chosen, lr=lr).step()
    elif optimizer == "adam":
        torch.optim.Adam(chosen, lr=lr, betas=(0.9, 0.999), eps=1e-8).step()
    elif optimizer == "normalized":
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in chosen))
        with torch.no_grad():
            for p in chosen:
                p -= (lr / norm) * p.grad
    else:
        raise SystemExit(f"unknown --optimizer {optimizer!r}")
    with torch.no_grad():
        after = model(input_ids=s_ids).logits[0, -1, :vocab].float()
        return float(loss.detach() - naive_rkl(after, t))


# ---------------------------------------------------------------- pairs

def tiny_pair(root: Path) -> tuple[str, str, str]:
    from conftest import save_pair, write_contexts

    teacher, student = save_pair(root)
    return teacher, student, str(write_contexts(root / "ctx.jsonl", n=60))  # 330 positions


def qwen25_pair(root: Path, n_contexts: int = 16, response: int = 256) -> tuple[str, str, str]:
    """Random-init models with the shapes of Qwen2.5-0.5B (student) and -1.5B (teacher); weights
    do not change speed. Contexts: 64-token prompts, `response`-token responses."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from conftest import make_tokenizer

    shapes = {"student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
              "teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)}
    tok = make_tokenizer()
    for name, shape in shapes.items():
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, **shape)
        Qwen2ForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(root / "student"))
    with open(root / "ctx.jsonl", "w") as f:
        for i in range(n_contexts):
            rec = {"id": f"c{i}", "prompt_ids": torch.randint(0, vocab, (64,), generator=g).tolist(),
                   "response_ids": torch.randint(0, vocab, (response,), generator=g).tolist()}
            f.write(json.dumps(rec) + "\n")
    return str(root / "teacher"), str(root / "student"), str(root / "ctx.jsonl")


def resolve_pair(name: str) -> tuple[str, str, str]:
    if name == "tiny":
        return tiny_pair(Path(tempfile.mkdtemp()))
    if name == "qwen2.5":
        return qwen25_pair(Path(tempfile.mkdtemp()))
    if name == "embedded":
        return "smollm2-135m", "smollm2-135m-pruned", str(DEMO_ROLLOUTS)
    raise SystemExit(f"unknown --pair {name!r} (tiny, embedded, qwen2.5)")


# ---------------------------------------------------------------- timing

class Clock:
    """Wall time with the device synchronised, so CUDA work is counted where it happens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.s = time.perf_counter() - self.t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def bf16_matmul_flops(device: torch.device) -> float:
    """Measured dense bf16 matmul rate (FLOP/s), the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    with Clock(device) as c:
        for _ in range(20):
            a @ a
    return 20 * 2 * 8192**3 / c.s


def run_teachdiag(mode: str, student, teacher, ctxs, by_ctx, vocab, lr, optimizer, device, batch: int):
    """gain_rkl per (context, position) (exact modes) or gain_first_order (linear), computed by
    the runner's own instruments (probe/instruments.py)."""
    params = "all" if mode in ("exact", "linear") else mode
    inst = make_instrument("linear" if mode == "linear" else "per_position", student=student, params=params,
                           loss="reverse_kl", optimizer=optimizer, lr=lr, vocab=vocab, batch=max(batch, 1))
    key = "gain_first_order" if mode == "linear" else "gain_rkl"
    group = list(by_ctx)
    results = inst.run(teacher, ctxs, by_ctx, group, device, lambda n, phase: None)
    return {(c, j): r[key] for c in group for j, r in zip(by_ctx[c], results[c])}


def two_forwards(student, teacher, ctxs, by_ctx, vocab, device) -> None:
    """The floor for lm_head mode: one teacher and one student forward per context, nothing else."""
    for c, pos in by_ctx.items():
        teacher_logits(teacher, ctxs[c], pos, vocab, device)
        ctx = ctxs[c]
        ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[: max(pos)], device=device)[None]
        keep = torch.tensor([len(ctx.prompt_ids) + j - 1 for j in pos], device=device)
        with torch.no_grad():
            student(input_ids=ids, logits_to_keep=keep, use_cache=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="tiny", help="tiny, embedded, qwen2.5 (or give the three paths)")
    ap.add_argument("--teacher", default="")
    ap.add_argument("--student", default="")
    ap.add_argument("--contexts", default="")
    ap.add_argument("--mode", default="exact", help="exact, lm_head, last:N, linear")
    ap.add_argument("--positions", type=int, default=20, help="positions timed")
    ap.add_argument("--naive-positions", type=int, default=0, help="time the naive reference on the first N only "
                    "(0: all); its rate is per position, so the ratio stays fair")
    ap.add_argument("--optimizer", default="normalized")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16, help="positions per batch in linear mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="teacher dtype (the student steps in float32)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if not args.teacher:
        args.teacher, args.student, args.contexts = resolve_pair(args.pair)
    vocab = len(load_tokenizer(args.student))
    teacher = load_model(args.teacher, "teacher", args.dtype, device)
    student = load_model(args.student, "student", "float32", device)
    ctxs = load_contexts(args.contexts, max_response_tokens=256)
    picks = select_positions(ctxs, args.positions, seed=0)
    by_ctx = by_context(picks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    naive_picks = picks[: args.naive_positions or len(picks)]
    params = "all" if args.mode in ("exact", "linear") else args.mode
    # warm-up: first calls pay for lazy initialisation, which belongs to neither side
    c0 = next(iter(by_ctx))
    naive_position(student, teacher, ctxs[c0], by_ctx[c0][0], vocab, args.lr, args.optimizer, params, device)
    run_teachdiag(args.mode, student, teacher, ctxs, {c0: by_ctx[c0][:1]}, vocab, args.lr, args.optimizer,
                  device, args.batch)
    with Clock(device) as t_naive:
        naive = [naive_position(student, teacher, ctxs[c], j, vocab, args.lr, args.optimizer, params, device)
                 for c, j in naive_picks]
    with Clock(device) as t_fast:
        fast = run_teachdiag(args.mode, student, teacher, ctxs, by_ctx, vocab, args.lr, args.optimizer, device,
                             args.batch)
    n = len(picks)
    result = {"mode": args.mode, "device": str(device), "threads": torch.get_num_threads(),
              "teacher": args.teacher, "student": args.student, "optimizer": args.optimizer, "lr": args.lr,
              "positions": n, "naive_positions": len(naive_picks),
              "naive_pos_per_s": len(naive_picks) / t_naive.s, "teachdiag_pos_per_s": n / t_fast.s,
              "speedup": (t_naive.s / len(naive_picks)) / (t_fast.s / n)}
    gains = [fast[p] for p in naive_picks]
    if args.mode == "linear":  # first-order vs exact: agreement, not equality
        with Clock(device) as t_exact:
            exact = run_teachdiag("exact", student, teacher, ctxs, by_ctx, vocab, args.lr, args.optimizer, device, 0)
        result["exact_pos_per_s"] = n / t_exact.s
        result["speedup_vs_exact"] = t_exact.s / t_fast.s
        result["spearman_vs_exact"] = float(spearmanr([exact[p] for p in picks], [fast[p] for p in picks])[0])
        result["median_exact_over_linear"] = float(torch.tensor([exact[p] / fast[p] for p in picks]).median())
    else:
        result["max_abs_gain_diff"] = max(abs(a - b) for a, b in zip(naive, gains))
        result["max_abs_gain"] = max(abs(a) for a in naive)
    if args.mode == "lm_head":
        with Clock(device) as t_fwd:
            two_forwards(student, teacher, ctxs, by_ctx, vocab, device)
        result["share_of_two_forwards_speed"] = t_fwd.s / t_fast.s
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        n_params = sum(p.numel() for p in student.parameters())
        flops = sum(8 * n_params * (len(ctxs[c].prompt_ids) + j) for c, j in picks)  # fwd 2NL + bwd 4NL + fwd 2NL
        result["mfu_bf16"] = flops / t_fast.s / bf16_matmul_flops(device)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
