"""A live fixed-bank monitor: every N steps, the checkpoint gain of the training student against
θ0 (the same teacher) on a frozen bank of rollouts: the paper's fixed-context diagnostic while a run goes.

    from teachdiag.integrations.monitor import FixedBank, MonitorCallback, monitor_step
    bank = FixedBank.load(teacher="T", student="S", contexts="bank.jsonl", positions="200")  # θ0 = S, kept frozen
    monitor_step(model, step=50, bank=bank, out="runs/opd")        # from any training loop
    trainer = DistillationTrainer(..., callbacks=[MonitorCallback(bank, out="runs/opd", every=50)])

Each check writes out/monitor/step_<n>/tokens.csv and run.json, exactly what `teachdiag probe
--student-after <the step's weights>` writes for the same bank (probe/instruments.py's checkpoint
instrument, probe/rows.label_rows and scores.teachability_columns as the probe uses them;
`teachdiag analyze` reads the folder like any run), adds the step's row to
out/monitor/trajectory.csv (analysis/trajectory.py: gains by teachability and C tercile, the Q3
gap) and redraws out/monitor/trajectory.png.
`teachdiag analyze out/monitor` recomputes the trajectory with bootstrap CIs.

Cost of a check: one teacher forward, one θ0 forward and one forward of the training student per
bank context, no gradient; every probed position of the bank is scored (bank.n_positions). The
bank keeps the teacher and θ0 in memory beside training, on bank.device (the model's). The
model is scored as it is (eval mode for the check, then back): a student trained in bfloat16 gives
bfloat16 logits, where the probe of its saved float32 copy would not.

Processes: single, or DDP through MonitorCallback (every rank scores, rank 0 writes); FSDP and
DeepSpeed are refused (refuse_sharded), as the model a callback is handed holds shards there.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from teachdiag.analysis.trajectory import COLUMNS, TRAJECTORY, plot_trajectory, trajectory_row
from teachdiag.analysis import plots
from teachdiag.config import ContextOptions, PairOptions, fill_embedded
from teachdiag.contexts import Context, by_context, parse_positions, select_positions
from teachdiag.errors import InputError
from teachdiag.models import resolve_device
from teachdiag.pair import open_pair
from teachdiag.probe.instruments import make_instrument
from teachdiag.probe.rows import label_rows
from teachdiag.probe.signals import SIGNAL_MODES
from teachdiag.scores import teachability_columns
from teachdiag.table import COLUMNS as TOKEN_COLUMNS
from teachdiag.table import RUN, TOKENS, rows_to_csv

MONITOR = "monitor"


@dataclass
class BankOptions(ContextOptions, PairOptions):
    """What a bank is loaded from: the probe's own options (config.py), so the same values select
    the same contexts, positions and vocabulary as `teachdiag probe`."""

    top_k: int = 16
    signals: str = "full"
    device: str = "auto"


@dataclass
class FixedBank:
    """The frozen rollouts, the teacher and θ0 (the student before training, float32, never stepped)."""

    teacher: torch.nn.Module
    theta0: torch.nn.Module
    contexts: list[Context]
    by_ctx: dict[int, list[int]]  # context index -> its scored positions, as the probe picks them
    vocab: int
    tokenizer: object
    device: torch.device
    keep: torch.Tensor | None = None  # the ids both tokenizers agree on (None: identical)
    top_k: int = 16
    signals: str = "full"
    options: dict = field(default_factory=dict)

    @classmethod
    def load(cls, teacher: str = "", student: str = "", contexts: str = "", positions: str = "all",
             seed: int = 0, top_k: int = 16, signals: str = "full", max_response_tokens: int = 0,
             device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False) -> FixedBank:
        """Load as `teachdiag probe` does (same arguments, same meaning; none of teacher, student,
        contexts: the embedded demo pair). `student` is θ0: the weights training starts from."""
        if signals not in SIGNAL_MODES:
            raise InputError(f"{signals!r} is not one of {', '.join(SIGNAL_MODES)}", field="signals")
        cfg = BankOptions(teacher=teacher, student=student, contexts=contexts, positions=positions, seed=seed,
                          top_k=top_k, signals=signals, max_response_tokens=max_response_tokens, device=device,
                          dtype=dtype, trust_remote_code=trust_remote_code)
        fill_embedded(cfg)
        pair = open_pair(cfg, resolve_device(device))  # the probe's own loader (pair.py)
        picks = select_positions(pair.contexts, parse_positions(positions), seed)
        return cls(pair.teacher, pair.student, pair.contexts, by_context(picks), pair.vocab, pair.tokenizer,
                   pair.device, pair.keep, top_k, signals, asdict(cfg))

    @property
    def n_positions(self) -> int:
        return sum(len(p) for p in self.by_ctx.values())


def score(model: torch.nn.Module, bank: FixedBank) -> pd.DataFrame:
    """tokens.csv's table for `model` as θτ against the bank's θ0: the probe's checkpoint rows, in
    file order, teachability and incompat normalised over the finite rows as the probe's are."""
    inst = make_instrument("checkpoint", student=bank.theta0, after=model, vocab=bank.vocab, top_k=bank.top_k,
                           keep=bank.keep, signals=bank.signals)
    rows = []
    for c, positions in bank.by_ctx.items():
        got = inst.run(bank.teacher, bank.contexts, bank.by_ctx, [c], bank.device, lambda n, phase: None)[c]
        rows += label_rows(got, bank.contexts[c], positions, bank.tokenizer.decode, inst.name)
    df = pd.DataFrame(rows, columns=TOKEN_COLUMNS)
    df["teachability"], df["incompat"] = teachability_columns(df["union_fkl"], df["compat_mass"],
                                                              df["finite"].to_numpy() == 1)
    return df


def _write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a reader never sees half a file
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    tmp.replace(path)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b are one device; "cuda" without an index is the current CUDA device."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0
    return a.type == b.type and index(a) == index(b)


def monitor_step(model: torch.nn.Module, step: int, bank: FixedBank, out: str | Path, write: bool = True) -> dict:
    """Score `model` (the student at training step `step`) on the bank and write out/monitor/step_<step>/
    (tokens.csv, run.json), the trajectory row and figure (module docstring). Returns the row.
    write=False scores and returns the row only: what a rank that is not the writer does."""
    device = next(model.parameters()).device
    if not same_device(device, bank.device):
        raise InputError(f"the model is on {device}, the bank's models on {bank.device}; load the bank with "
                         f"device={str(device)!r}", field="device")
    was_training = model.training
    t0 = time.time()
    try:
        model.eval()  # no dropout while scoring
        df = score(model, bank)
    finally:
        model.train(was_training)
    seconds = time.time() - t0
    row = dict(trajectory_row(df, step), seconds=round(seconds, 3))
    row["positions_per_s"] = len(df) / seconds if seconds > 0 else math.nan
    if write:
        save_check(Path(out) / MONITOR, int(step), df, row, bank)
    return row


def save_check(folder: Path, step: int, df: pd.DataFrame, row: dict, bank: FixedBank) -> None:
    """Write one check: folder/step_<step>/ (tokens.csv, run.json), its row of folder/trajectory.csv
    (replacing an older row of the same step) and folder/trajectory.png."""
    step_dir = folder / f"step_{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    rows = df.to_dict("records")
    for r in rows:  # plain floats, written repr-exact as every tokens.csv (table.rows_to_csv)
        for c, v in r.items():
            r[c] = float(v) if isinstance(v, (float, np.floating)) else v
    _write(step_dir / TOKENS, rows_to_csv(rows, header=True))
    record = {"command": "teachdiag.integrations.monitor.monitor_step", "complete": True,
              "monitor": {"step": step, "seconds": row["seconds"], "positions": len(df)},
              "options": bank.options, "top_k": bank.top_k, "signals": bank.signals,
              "step": {"instrument": "checkpoint", "probe": "CheckpointScore",
                       "theta1": f"the training student at step {step}; θ0 the bank's student"}}
    _write(step_dir / RUN, json.dumps(record, indent=2, default=str) + "\n")

    path = folder / TRAJECTORY
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=[*COLUMNS, "seconds", "positions_per_s"])
    traj = pd.concat([old[old["step"] != step], pd.DataFrame([row])], ignore_index=True).sort_values("step")
    _write(path, traj.to_csv(index=False))
    plots.save(plot_trajectory(traj), folder, "trajectory", _write)


def refuse_sharded(args) -> None:
    """MonitorCallback is tested single-process and its forwards are plain ones: refuse FSDP and
    DeepSpeed (args: TrainingArguments), where the model it is handed holds shards."""
    kind = getattr(getattr(args, "distributed_state", None), "distributed_type", None)
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None) or kind in ("FSDP", "DEEPSPEED"):
        raise InputError("MonitorCallback runs single-process or under DDP only, not FSDP or DeepSpeed; save "
                         "checkpoints and score them with `teachdiag probe --student-after` instead",
                         field="accelerator")


class MonitorCallback(TrainerCallback):
    """A transformers TrainerCallback (TRL's trainers are Trainers): monitor_step every `every`
    optimizer steps. Under DDP every process scores the whole bank, so all of them spend the same
    time away from training and meet at the next gradient all-reduce together (a rank-0-only check
    would leave the others waiting there, against the NCCL watchdog's timeout); the world's process
    zero writes. Single process or DDP only (refuse_sharded); each process loads its bank on its
    own device (FixedBank.load(..., device=str(training_args.device)))."""

    def __init__(self, bank: FixedBank, out: str | Path, every: int = 10) -> None:
        if every < 1:
            raise InputError(f"must be >= 1, got {every}", field="every")
        self.bank, self.out, self.every = bank, out, every

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharded(args)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            monitor_step(model, state.global_step, self.bank, self.out, write=state.is_world_process_zero)
        return control
