"""Probe speed: teachdiag's exact probe against a naive reference, same contexts, same process.

    python benchmarks/probe_speed.py                         # tiny random pair, CPU
    python benchmarks/probe_speed.py --student smollm2-135m-pruned --teacher smollm2-135m \
        --contexts data/demo_rollouts.jsonl --positions 8     # the embedded pair

The naive reference does what the definition says: for every position, deep-copy the student,
run the teacher on that position's prefix, forward + backward the copy on the full prefix, step,
forward again. teachdiag runs the teacher once per context and steps/restores in place.
Prints positions/s of both, their ratio, the largest |gain difference| (the fast path must
compute the same numbers) and peak resident memory. Timings belong in benchmarks/RESULTS.md,
never in tests.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from teachdiag.contexts import load_contexts, select_positions  # noqa: E402
from teachdiag.models import load_model, load_tokenizer  # noqa: E402
from teachdiag.probe import SingleStepProbe, select_params, step_direction, global_norm  # noqa: E402
from teachdiag.signals import probe_loss, signals_from_logits  # noqa: E402


def naive_position(student, teacher, ctx, j: int, vocab: int, lr: float, optimizer: str) -> float:
    """gain_rkl at position j: deep copy, per-position teacher forward, full-prefix recompute."""
    model = copy.deepcopy(student)
    params = [p for _, p in select_params(model, "all")]
    s_ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[:j])[None]
    t_ids = torch.tensor(ctx.teacher_view + ctx.response_ids[:j])[None]
    y = torch.tensor([ctx.response_ids[j]])
    with torch.no_grad():
        t = teacher(input_ids=t_ids).logits[0, -1:, :vocab].float()
    for p in params:
        p.requires_grad_(True)
    s = model(input_ids=s_ids).logits[0, -1:, :vocab].float()
    grads = torch.autograd.grad(probe_loss(s, t, y, "reverse_kl"), params)
    with torch.no_grad():
        directions, scale = step_direction(list(grads), optimizer, global_norm(grads))
        for p, d in zip(params, directions):
            p.add_(d, alpha=-lr * scale)
        after = model(input_ids=s_ids).logits[0, -1:, :vocab].float()
    before = signals_from_logits(s.detach(), t, y)["rkl"].item()
    return before - signals_from_logits(after, t, y)["rkl"].item()


def tiny_pair(root: Path) -> tuple[str, str, str]:
    from conftest import save_pair, write_contexts

    teacher, student = save_pair(root)
    return teacher, student, str(write_contexts(root / "ctx.jsonl", n=6))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="")
    ap.add_argument("--student", default="")
    ap.add_argument("--contexts", default="")
    ap.add_argument("--positions", type=int, default=20, help="positions timed in each mode")
    ap.add_argument("--optimizer", default="normalized")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if not args.teacher:
        args.teacher, args.student, args.contexts = tiny_pair(Path(tempfile.mkdtemp()))
    tok = load_tokenizer(args.student)
    vocab = len(tok)
    teacher, student = load_model(args.teacher), load_model(args.student)
    ctxs = load_contexts(args.contexts, max_response_tokens=192)
    picks = select_positions(ctxs, args.positions, seed=0)

    t0 = time.perf_counter()
    naive = [naive_position(student, teacher, ctxs[c], j, vocab, args.lr, args.optimizer) for c, j in picks]
    t_naive = time.perf_counter() - t0

    t0 = time.perf_counter()
    probe = SingleStepProbe(student, "all", "reverse_kl", args.optimizer, args.lr, vocab)
    fast = []
    for c in sorted({c for c, _ in picks}):
        ctx, pos = ctxs[c], [j for cc, j in picks if cc == c]
        with torch.no_grad():
            t_in = torch.tensor(ctx.teacher_view + ctx.response_ids[:-1])[None]
            t_logits = teacher(input_ids=t_in, logits_to_keep=len(ctx.response_ids)).logits[0, :, :vocab].float()
        ids = torch.tensor(ctx.prompt_ids + ctx.response_ids)
        fast += [r["gain_rkl"] for r in probe.run_context(ids, len(ctx.prompt_ids), t_logits[pos], pos)]
    t_fast = time.perf_counter() - t0

    n = len(picks)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "teacher": args.teacher,
              "student": args.student, "positions": n, "naive_pos_per_s": n / t_naive,
              "teachdiag_pos_per_s": n / t_fast, "speedup": t_naive / t_fast,
              "max_abs_gain_diff": max(abs(a - b) for a, b in zip(naive, fast)),
              "max_abs_gain": max(abs(a) for a in naive),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
