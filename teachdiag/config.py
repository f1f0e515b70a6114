"""Config ingredients shared by the commands that load a teacher/student pair.

    from teachdiag.config import PairOptions, ContextOptions, StepOptions, DeviceOptions
    from teachdiag.flags import opt
    @dataclass
    class MyConfig(DeviceOptions, ContextOptions, PairOptions):   # --help shows Pair, Context, Device
        out: str = opt("output folder", "runs/x")

A command's config inherits the ingredients it needs, so probe, calibrate, score and train share
one definition of --teacher, --loss, --lr, ... each with its help written once (flags.py turns
fields into flags). Also here: the checks those options share (embedded demo, lr, counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from teachdiag.demo import DEMO_ROLLOUTS
from teachdiag.demo.zoo import STUDENT, TEACHER
from teachdiag.errors import InputError
from teachdiag.flags import opt
from teachdiag.probe.signals import LOSSES
from teachdiag.probe.steps import OPTIMIZERS, RULES

# the embedded demo: what a command runs with no models or contexts given
EMBEDDED = {"teacher": TEACHER, "student": STUDENT, "contexts": str(DEMO_ROLLOUTS)}
DEMO_POSITIONS = "200"  # ~6 min on 2 CPU cores; --positions all for all 51,600


# ---------------------------------------------------------------------------- ingredients

@dataclass
class PairOptions:
    """Which teacher and student, and how they are loaded."""

    teacher: str = opt("teacher model: local folder, hub id or short name (none of teacher/student/"
                       "contexts given: the embedded demo pair)", "")
    student: str = opt("student model: local folder, hub id or short name (default: the embedded pair)", "")
    dtype: str = opt("teacher forward dtype; the student always runs and steps in float32", "float32",
                     choices=["float32", "bfloat16"])
    trust_remote_code: bool = opt("allow model folders that load their own code (only if you trust it)", False)
    strict_tokenizer: bool = opt("refuse a pair whose tokenizers differ in added/special tokens (by default "
                                 "such pairs run over the ids both agree on, and run.json lists the others)", False)
    student_base: str = opt("base model of a PEFT adapter given as --student (default: the adapter's "
                            "base_model_name_or_path)", "")
    teacher_base: str = opt("base model of a PEFT adapter given as --teacher (default: the adapter's "
                            "base_model_name_or_path)", "")


@dataclass
class ContextOptions:
    """Which frozen contexts, and which of their positions."""

    contexts: str = opt("frozen rollouts, JSONL or Parquet (default: the demo rollouts)", "")
    positions: str = opt(f"'all', or N for a seeded uniform sample of N positions over the file "
                         f"[default: all; {DEMO_POSITIONS} on the demo; calibrate: 64]", "", show_default=False)
    max_response_tokens: int = opt("truncate each response to M tokens (0: keep all; the paper used 192)", 0)
    seed: int = opt("seed for position sampling", 0)
    raw_text: bool = opt("tokenize text records' prompt strings as plain text, not through the chat "
                         "template (the default encodes them as `teachdiag rollout` does)", False)


_LR_DEFAULTS = ", ".join(f"{r.name} {r.default_lr:g}" for r in RULES.values())


@dataclass
class StepOptions:
    """The loss and the step rule of the probe (probe/steps.py)."""

    loss: str = opt("probe loss at a position, teacher fixed", "reverse_kl", choices=list(LOSSES))
    optimizer: str = opt("step rule: " + "; ".join(f"{r.name}: {r.formula}" for r in RULES.values()),
                         "normalized", choices=list(OPTIMIZERS))
    lr: str = opt(f"step size [default per rule: {_LR_DEFAULTS}]; 'auto': the largest lr in the linear "
                  "regime on a seeded sample (as `teachdiag calibrate`)", "", show_default=False)
    params: str = opt("parameters the step touches: all, lm_head, last:N (last N blocks + final norm + head)", "all")
    top_k: int = opt("K of the student's top-K for compat_mass, topk_entropy, union_fkl", 16)


@dataclass
class DeviceOptions:
    """Where it runs, and how loudly."""

    device: str = opt("auto, cpu or cuda[:N]", "auto")
    threads: int = opt("torch CPU threads (0: torch's default, one per core). On a shared machine give "
                       "fewer than the free cores: two threads beside another busy job ran 20x slower", 0)
    quiet: bool = opt("no progress bar", False)


# ---------------------------------------------------------------------------- checks shared by commands

def fill_embedded(cfg, demo: dict[str, str] = EMBEDDED) -> bool:
    """Fill teacher/student/contexts with an embedded demo (the distillation pair by default;
    viability passes its self-distillation setting) when none is given; True if so. Giving some
    but not all of the three is an input error."""
    given = [bool(cfg.teacher), bool(cfg.student), bool(cfg.contexts)]
    if not any(given):
        cfg.teacher, cfg.student, cfg.contexts = demo["teacher"], demo["student"], demo["contexts"]
        return True
    if not all(given):
        raise InputError("give --teacher, --student and --contexts together (or none, for the demo)",
                         field="--teacher/--student/--contexts")
    return False


def parse_lr(value: str | float, optimizer: str) -> float | str:
    """--lr as a positive float, 'auto', or the step rule's default when empty."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if optimizer not in RULES:
        raise InputError(f"unknown step rule {optimizer!r}; one of {', '.join(RULES)}", field="--optimizer")
    if value in ("", None):
        return RULES[optimizer].default_lr
    try:
        lr = float(value)
    except ValueError:
        raise InputError(f"must be a number or 'auto', got {value!r}", field="--lr") from None
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"must be positive, got {lr:g}", field="--lr")
    return lr


def require(checks: list[tuple[bool, str, str]]) -> None:
    """The first failed (ok, flag, message) check as an InputError naming its flag."""
    for ok, flag, msg in checks:
        if not ok:
            raise InputError(msg, field=flag)


def check_positive(**values: int) -> None:
    """Each named option must be >= 1 (names as flags: top_k -> --top-k)."""
    require([(v >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {v}") for name, v in values.items()])


def apply_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise InputError(f"must be >= 0, got {threads}", field="--threads")
    if threads:
        torch.set_num_threads(threads)


