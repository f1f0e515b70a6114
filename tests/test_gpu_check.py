"""The GPU check's CPU dry run: `scripts/gpu_check.sh --device cpu --tiny` runs every stage and measures.

The check itself waits for a lent GPU (benchmarks/gpu_check.py); this runs the same stages on tiny
models and a 16-token cut of the demo rollouts, so the script cannot rot between GPUs. Its numbers
are cross-checked against a separate `teachdiag probe` run of the same positions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from teachdiag.demo import zoo
from teachdiag.errors import InputError
from teachdiag.table import read_tokens

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_costs  # noqa: E402
import gpu_pairs  # noqa: E402

PAIR_STAGES = ["build", "exact", "naive", "shared", "linear", "train", "checkpoint"]
MEASURING = ["exact", "naive", "shared", "linear", "train", "checkpoint"]


def demo_available() -> bool:
    """The embedded teacher is converted, or can be (its package is installed)."""
    try:
        zoo.resolve(zoo.TEACHER)
        return True
    except InputError:
        return False


@pytest.mark.parametrize("name, match", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                         ("NVIDIA H100 PCIe", "h100 pcie"), ("NVIDIA H100 NVL", "h100 nvl"),
                                         ("NVIDIA A100-SXM4-80GB", "a100"), ("Tesla V100-SXM2-16GB", "unknown")])
def test_device_peak_by_name(name, match):
    peak = gpu_costs.device_peak(name)
    assert peak["match"] == match
    assert (peak["bf16"] is None) == (match == "unknown")


def test_flop_count_covers_every_stored_parameter_and_counts_stages(tmp_path):
    """Shape.of's block parameters + the (tied) embedding + the norms are exactly what the folder stores,
    so the FLOP count misses no matrix; and the stage rules scale as the docstring says."""
    shape = gpu_pairs.SHAPES["tiny"]
    teacher, student, contexts = gpu_pairs.build_pair(tmp_path, shape, "cpu")
    for folder, who in ((teacher, "teacher"), (student, "student")):
        s, c = gpu_costs.Shape.of(folder), shape[who]
        d, layers, hd = c["hidden_size"], c["num_hidden_layers"], c["hidden_size"] // c["num_attention_heads"]
        norms = (2 * layers + 1) * d  # two RMSNorms a block and the final one
        biases = layers * (d + 2 * c["num_key_value_heads"] * hd)  # Qwen2's q, k, v biases (vectors, no FLOPs)
        stored = gpu_costs.n_params(folder)
        assert s.body + s.vocab_rows * d + norms + biases == stored
    from teachdiag.contexts import load_contexts

    ctxs = {c.id: c for c in load_contexts(contexts)}
    t, s = gpu_costs.Shape.of(teacher), gpu_costs.Shape.of(student)
    picks = [("c0", [0, 5]), ("c1", [11])]
    f_t, exact = gpu_costs.stage_flops("exact", t, s, ctxs, picks)
    _, linear = gpu_costs.stage_flops("linear", t, s, ctxs, picks)
    assert linear == pytest.approx(exact * 3 / 4)  # fwd + bwd, vs fwd + bwd + fwd
    assert f_t == t.forward(8 + 5, 2) + t.forward(8 + 11, 1)  # one teacher forward per context
    out = gpu_costs.mfu(f_t, exact, 2.0, gpu_costs.device_peak("NVIDIA H200"), "bfloat16")
    assert out["mfu"] == pytest.approx((f_t / 989e12 + exact / 67e12) / 2.0)
    assert gpu_costs.mfu(f_t, exact, 2.0, gpu_costs.device_peak("cpu"), "bfloat16")["mfu"] is None


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_stage(tmp_path):
    out, work = tmp_path / "check", tmp_path / "work"
    pairs = "shapes,demo" if demo_available() else "shapes"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out),
                           "--work", str(work), "--pairs", pairs], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    header = json.loads((out / "header.json").read_text())
    assert header == summary["header"]
    for key in ("commit", "date", "device", "device_name", "torch", "cuda", "transformers", "peak_flops"):
        assert key in header, key
    assert header["tiny"] is True and header["peak_flops"]["match"] == "cpu"

    stages = {(r["stage"], r["pair"]): r for r in summary["stages"]}
    want = [("tests", "-")] + [(s, p) for p in pairs.split(",") for s in PAIR_STAGES if (s, p) != ("build", "demo")]
    assert list(stages) == want
    for key, r in stages.items():
        assert r["status"] == "ok", (key, r.get("error"), r.get("traceback"))
        assert r["wall_s"] > 0 and r["peak_memory_mb"] > 0
    assert stages[("tests", "-")]["passed"] >= 1
    for pair in pairs.split(","):
        for stage in MEASURING:
            r = stages[(stage, pair)]
            assert r["positions"] > 0 and r["seconds"] > 0, (stage, pair)
            assert r["positions_per_s"] == pytest.approx(r["positions"] / r["seconds"])
            assert r["flops"] > 0 and r["memory_model_mb"] > 0
            assert r["mfu"] is None and r["mfu_bf16"] is None  # no peak to divide by on a CPU
        assert stages[("naive", pair)]["speedup_vs_naive"] > 0
        assert stages[("checkpoint", pair)]["note"] == ""  # it scored the model train wrote
    assert all(t["verdict"] == "not measured" for t in summary["targets"])

    # the three result files agree, one row per stage
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == summary["stages"]
    table = pd.read_csv(out / "results.csv")
    assert list(zip(table["stage"], table["pair"].astype(str))) == want

    # cross-check: the exact stage's table is what `teachdiag probe` writes for the same pair and positions
    shapes = work / "shapes"
    exact = stages[("exact", "shapes")]
    cli = subprocess.run([sys.executable, "-m", "teachdiag", "probe", "--teacher", str(shapes / "teacher"),
                          "--student", str(shapes / "student"), "--contexts", str(shapes / "contexts.jsonl"),
                          "--positions", str(exact["positions"]), "--dtype", "bfloat16", "--device", "cpu",
                          "--lr", "0.001", "--quiet", "--out", str(tmp_path / "cli")],
                         env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    ours, theirs = read_tokens(Path(exact["run"]) / "tokens.csv"), read_tokens(tmp_path / "cli/tokens.csv")
    assert len(ours) == exact["positions"] == 12
    record = json.loads((Path(exact["run"]) / "run.json").read_text())
    assert exact["positions_per_s"] == pytest.approx(record["positions_per_s"])
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert (ours["gain_rkl"].abs() > 1e-5).all()  # real steps, not zeros
    # ... and the naive reference, a separate implementation, gives the same gains at its positions
    naive = stages[("naive", "shapes")]
    assert naive["positions"] == len(naive["gains"]) == 3
    assert naive["gains"] == pytest.approx(list(theirs["gain_rkl"][:3]), rel=1e-2, abs=1e-6)
    assert naive["max_abs_gain_diff"] <= 1e-2 * naive["max_abs_gain"]


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    """A --work whose pair is broken (contexts but no models): every stage fails on its own, is
    recorded with its error, and the check still ends with its files; past --budget-s, stages skip."""
    import gpu_check

    work = tmp_path / "work"
    (work / "shapes").mkdir(parents=True)
    gpu_pairs.write_contexts(work / "shapes" / "contexts.jsonl", 2, 3, 4, n_words=50)  # build reuses it
    summary = gpu_check.main(["--device", "cpu", "--tiny", "--pairs", "shapes", "--only", "exact,naive",
                              "--out", str(tmp_path / "out"), "--work", str(work)])
    status = [(r["stage"], r["status"]) for r in summary["stages"]]
    assert status == [("build", "ok"), ("exact", "error"), ("naive", "error")]
    assert "model folder not found" in summary["stages"][1]["error"]
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3

    late = gpu_check.main(["--device", "cpu", "--tiny", "--pairs", "shapes", "--only", "tests,exact",
                           "--budget-s", "-1", "--out", str(tmp_path / "late"), "--work", str(work)])
    assert [r["status"] for r in late["stages"]] == ["skipped"] * 3
