"""What a GPU check stage should cost: model FLOPs, the device's dense peak, and a memory model.

    from gpu_costs import device_peak, Shape, stage_flops, memory_model, mfu, verdicts
    # (benchmarks/ on sys.path, as gpu_check.py puts it)
    peak = device_peak("NVIDIA H200")                  # {"match": "h200", "bf16": 989e12, "fp32": 67e12}
    f_teacher, f_student = stage_flops("exact", Shape.of(t_dir), Shape.of(s_dir), ctxs, [("c0", [3, 9])])

Model FLOPs are the matrix work the definition needs, not what an implementation happens to do
(recomputation and padding are not counted, so they lower the MFU). One forward over T tokens with
logits at R rows:
    2·B·T               B = the blocks' matrix parameters (embeddings are lookups, not matmuls)
  + 2·layers·W·T²       causal attention: QKᵀ and AV over half the T×T square each, W = heads·head_dim
  + 2·d·V·R             the LM head, only at the R rows whose logits are computed
A backward is 2 forwards, so forward + backward is the usual ~6·N·tokens. Per stage (student
forwards counted in units of one forward over the prefix or context):
  exact, naive   per position j: forward + backward + forward after the step of its prefix (4)
  linear         per position j: forward + backward of its prefix (3)
  shared         per context: forward + backward (3), forward-mode pass (2: primal and tangent),
                 re-score forward (1)
  checkpoint     per context: a forward of each checkpoint (2)
  train          per context of each step: a forward for the selector's scores, forward + backward (4)
and one teacher forward per context up to the last probed position (naive: one per position).

MFU = FLOPs / seconds / peak, against the dense bf16 and the fp32 (non-tensor-core) peak of the
device, from PEAKS by name ("unknown" elsewhere; null on CPU). `mfu` itself counts each model at
its own dtype's peak: the teacher's FLOPs at bf16 (with --dtype bfloat16) and the student's at fp32,
since the student always runs in float32 and torch leaves TF32 off. It is the share of the measured
time a device at peak would need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from teachdiag.provenance import safetensors_dtypes, weight_files

# (substring of torch.cuda.get_device_name, lowercased; dense bf16 FLOP/s; fp32 non-tensor FLOP/s),
# first match wins: the PCIe and NVL H100s before the plain "h100" (SXM, "H100 80GB HBM3")
PEAKS = [("h200", 989e12, 67e12), ("h100 pcie", 756e12, 51e12), ("h100 nvl", 835e12, 60e12),
         ("h100", 989e12, 67e12), ("a100", 312e12, 19.5e12)]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def device_peak(name: str | None) -> dict:
    """{"match", "bf16", "fp32"} for a CUDA device name; match "unknown" and None peaks otherwise."""
    low = (name or "").lower()
    for key, bf16, fp32 in PEAKS:
        if key in low:
            return {"match": key, "bf16": bf16, "fp32": fp32}
    return {"match": "unknown", "bf16": None, "fp32": None}


@dataclass
class Shape:
    """What the FLOP count needs from a model's config.json."""

    body: int  # matrix parameters of the blocks
    hidden: int
    vocab_rows: int
    layers: int
    attn_width: int  # heads × head_dim

    @classmethod
    def of(cls, model_dir: str | Path) -> "Shape":
        c = json.loads((Path(model_dir) / "config.json").read_text())
        d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        hd = c.get("head_dim") or d // heads
        attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o
        return cls(layers * (attn + 3 * d * f), d, c["vocab_size"], layers, heads * hd)

    def forward(self, tokens: int, rows: int) -> float:
        return 2.0 * self.body * tokens + 2.0 * self.layers * self.attn_width * tokens**2 \
            + 2.0 * self.hidden * self.vocab_rows * rows


def stage_flops(stage: str, teacher: Shape, student: Shape, ctxs: dict, picks: list[tuple[str, list[int]]],
                first_order: bool = True) -> tuple[float, float]:
    """(teacher FLOPs, student FLOPs) of a stage. ctxs: context id -> Context; picks: (context id, its
    probed positions) pairs (train: every position of each context of each step, a pair per step)."""
    f_t = f_s = 0.0
    for cid, positions in picks:
        ctx = ctxs[cid]
        n, view, last = len(ctx.prompt_ids), len(ctx.teacher_view), max(positions)
        per_position = [student.forward(n + j, 1) for j in positions]
        if stage == "naive":
            f_t += sum(teacher.forward(view + j, 1) for j in positions)
        else:
            f_t += teacher.forward(view + last, len(positions))
        if stage in ("exact", "naive"):
            f_s += 4 * sum(per_position)
        elif stage == "linear":
            f_s += 3 * sum(per_position)
        elif stage == "shared":
            f_s += (6 if first_order else 4) * student.forward(n + last, len(positions))
        elif stage == "checkpoint":
            f_s += 2 * student.forward(n + last, len(positions))
        elif stage == "train":
            f_s += 4 * student.forward(n + last, len(positions))
        else:
            raise ValueError(f"no FLOP count for stage {stage!r}")
    return f_t, f_s


def mfu(f_teacher: float, f_student: float, seconds: float, peak: dict, teacher_dtype: str) -> dict:
    """MFU against the bf16 and fp32 peaks, and `mfu` with each model at its dtype's peak (None without a peak)."""
    total = f_teacher + f_student
    out = {"flops": total, "tflops_per_s": total / seconds / 1e12 if seconds > 0 else None,
           "mfu_bf16": None, "mfu_fp32": None, "mfu": None}
    if peak.get("bf16") and seconds > 0:
        t_peak = peak["bf16"] if teacher_dtype == "bfloat16" else peak["fp32"]
        out.update(mfu_bf16=total / seconds / peak["bf16"], mfu_fp32=total / seconds / peak["fp32"],
                   mfu=(f_teacher / t_peak + f_student / peak["fp32"]) / seconds)
    return out


def n_params(model_dir: str | Path) -> int:
    """Parameters stored in a folder's safetensors files (a tied head is stored once)."""
    return sum(sum(safetensors_dtypes(f).values()) for f in weight_files(model_dir) if f.suffix == ".safetensors")


# bytes per student parameter the README's rule counts, by stage: float32 weights, and
#   exact / linear / shared / naive: θ0's saved copy (or naive's deep copy) and one gradient (12)
#   checkpoint: the second checkpoint's weights (8);  train: the gradient and AdamW's two moments (16)
STUDENT_BYTES = {"exact": 12, "naive": 12, "linear": 12, "shared": 12, "checkpoint": 8, "train": 16}


def memory_model(stage: str, teacher_dir: str, student_dir: str, teacher_dtype: str) -> float:
    """Predicted peak bytes of a stage: the README's rule (teacher weights at their dtype + STUDENT_BYTES
    per student parameter), activations and logits not counted. BatchedProbe (exact) adds per-position
    gradients sized to a quarter of the free GPU memory by design, so its peak sits far above this."""
    return DTYPE_BYTES[teacher_dtype] * n_params(teacher_dir) + STUDENT_BYTES[stage] * n_params(student_dir)


# the targets: (stage, result key, target, test); stage None: every stage with a memory model
TARGETS = [("naive", "speedup_vs_naive", "exact per-position >= 10x the naive reference", lambda v: v >= 10),
           ("shared", "mfu", "shared step >= 40% MFU", lambda v: v >= 0.40),
           ("checkpoint", "mfu", "checkpoint scoring >= 40% MFU", lambda v: v >= 0.40),
           (None, "peak_over_model", "memory model within 15% of the measured peak", lambda v: abs(v - 1) <= 0.15)]


def verdicts(results: list[dict], measured: bool) -> list[dict]:
    """Each target on each stage it applies to: met, not met, or not measured (on a CPU, or the stage failed)."""
    out = []
    for r in results:
        for stage, key, what, ok in TARGETS:
            if r["stage"] == stage or (stage is None and "memory_model_mb" in r):
                value = r.get(key) if measured else None
                out.append({"target": what, "stage": r["stage"], "pair": r["pair"], "value": value,
                            "verdict": "not measured" if value is None else "met" if ok(value) else "not met"})
    return out
