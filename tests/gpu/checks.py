"""Device-generic checks of the probe, run on CPU and (where torch sees a GPU) CUDA by test_devices.py.

Each takes a torch device name; the same code runs on both, so the CUDA tests are not untested
code on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import naive_probe
from teachdiag.contexts import load_contexts
from teachdiag.probe.exact import SingleStepProbe
from teachdiag.probe.fast import BatchedProbe
from teachdiag.probe.forward import teacher_logits
from teachdiag.commands.probe import ProbeConfig, run_probe
from teachdiag.table import read_tokens

VOCAB = 68  # the test tokenizer's length (conftest)
LR = {"sgd": 1e-3, "adam": 1e-4, "normalized": 1e-2}  # the tiny pair's linear-ish regime (test_exact.py)


def load(path, device="cpu", dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model


def probe_rows(kind: str, student, teacher, ctx, positions, loss, optimizer, device) -> list[dict]:
    cls = {"SingleStepProbe": SingleStepProbe, "BatchedProbe": BatchedProbe}[kind]
    probe = cls(student, "all", loss, optimizer, LR[optimizer], VOCAB)
    ids = torch.tensor(ctx.prompt_ids + ctx.response_ids, device=device)
    return probe.run_context(ids, len(ctx.prompt_ids), teacher_logits(teacher, ctx, positions, VOCAB, device),
                             positions)


def check_exact_equals_float64_reference(device, pair, contexts, loss, optimizer):
    """BatchedProbe and SingleStepProbe on `device` (float32) against the naive probe in float64 on CPU."""
    t_cpu, s_cpu = load(pair[0]), load(pair[1])
    teacher, student = load(pair[0], device), load(pair[1], device)
    ctxs = load_contexts(contexts)
    raw = [json.loads(line) for line in open(contexts)]
    for c in (0, 1):  # one context with a teacher view of its own, one without
        positions = list(range(len(ctxs[c].response_ids)))
        refs = [naive_probe(s_cpu, t_cpu, raw[c], j, VOCAB, loss, optimizer, LR[optimizer], dtype=torch.float64)
                for j in positions]
        for kind in ("SingleStepProbe", "BatchedProbe"):
            rows = probe_rows(kind, student, teacher, ctxs[c], positions, loss, optimizer, device)
            for j, row, ref in zip(positions, rows, refs):
                where = (kind, c, j)
                # float32 forwards (any device) vs float64: ~1e-7 nats in each KL, ~1e-6 relative in g;
                # the gain is a difference of two KLs, hence the absolute floor (as in test_exact.py)
                assert row["finite"] == 1, where
                assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), where
                for col in ("fkl", "rkl", "fkl_after", "rkl_after"):
                    assert row[col] == pytest.approx(ref[col], rel=1e-5, abs=1e-6), (*where, col)
                for col in ("gain_fkl", "gain_rkl"):
                    assert row[col] == pytest.approx(ref[col], rel=2e-3, abs=2e-6), (*where, col)


def check_theta0_restored(device, pair, contexts):
    """Every rule, both probes, big steps: the student's tensors on `device` are equal bit for bit after."""
    teacher, student = load(pair[0], device), load(pair[1], device)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ctx = load_contexts(contexts)[3]
    positions = list(range(len(ctx.response_ids)))
    for optimizer in ("sgd", "adam", "normalized"):
        for kind in ("SingleStepProbe", "BatchedProbe"):
            rows = probe_rows(kind, student, teacher, ctx, positions, "reverse_kl", optimizer, device)
            assert all(r["gain_rkl"] != 0 for r in rows)  # the steps did happen
    after = student.state_dict()
    assert all(after[k].device.type == torch.device(device).type for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in student.parameters())


def run(tmp_path, pair, contexts, name, device, **kw) -> pd.DataFrame:
    cfg = ProbeConfig(teacher=pair[0], student=pair[1], contexts=str(contexts), out=str(tmp_path / name),
                      device=device, quiet=True, **kw)
    return read_tokens(run_probe(cfg, []) / "tokens.csv")


def check_bf16_teacher(device, tmp_path, pair, contexts):
    """Teacher in bfloat16, student in float32: the run works and ranks positions as the fp32 run does."""
    f32 = run(tmp_path, pair, contexts, "f32", device, positions="12")
    bf16 = run(tmp_path, pair, contexts, "bf16", device, positions="12", dtype="bfloat16")
    record = json.loads((tmp_path / "bf16/run.json").read_text())
    assert record["teacher"]["dtype"] == "bfloat16" and record["step"]["student_compute_dtype"] == "float32"
    assert (bf16["finite"] == 1).all() and (bf16["gain_rkl"].abs() > 1e-4).all()
    assert list(bf16["position"]) == list(f32["position"])
    assert bf16["gain_rkl"].corr(f32["gain_rkl"]) > 0.98


def check_torchrun_one_rank(device, tmp_path, pair, contexts):
    """`torchrun --nproc_per_node 1 -m teachdiag probe` gives the table of a plain run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same thread count in both processes
    args = ["probe", "--teacher", pair[0], "--student", pair[1], "--contexts", str(contexts), "--device", device,
            "--quiet", "--positions", "10", "--seed", "3"]
    plain = subprocess.run([sys.executable, "-m", "teachdiag", *args, "--out", str(tmp_path / "plain")],
                           env=env, capture_output=True, text=True)
    ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "-m", "teachdiag", *args, "--out", str(tmp_path / "ranked")],
                            env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert ranked.returncode == 0, ranked.stderr
    a, b = read_tokens(tmp_path / "plain/tokens.csv"), read_tokens(tmp_path / "ranked/tokens.csv")
    assert len(a) == 10
    if torch.device(device).type == "cpu":
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # same process layout: same floats
    else:
        # CUDA: same kernels, but the embedding backward accumulates with atomics, whose order is
        # not fixed; float32 rounding of that order moves gains by ~1e-7 relative at most
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-8)
    assert json.loads((tmp_path / "ranked/run.json").read_text())["world_size"] == 1
