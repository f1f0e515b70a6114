"""`teachdiag probe`: contexts → signals → single-step probe → tokens.csv + run.json.

    from teachdiag.commands.probe import ProbeConfig, run_probe
    run_probe(ProbeConfig(teacher="T", student="S", contexts="rollouts.jsonl", out="runs/r1"))

The teacher runs once per context (every probed position from one forward); the student is
probed position by position (probe/exact.py, probe/fast.py). Rows are saved per finished context, so a run that
dies keeps its work and `--resume` continues it.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from teachdiag import __version__, distributed
from teachdiag.contexts import Context, by_context, parse_positions, select_positions
from teachdiag.calibration import BAND, MAX_NEGATIVE, RULE, auto_lr
from teachdiag.errors import InputError, UnsupportedModel
from teachdiag.probe.instruments import make_instrument
from teachdiag.probe.rows import label_rows
from teachdiag.probe.signals import LOSSES, SIGNAL_MODES
from teachdiag.models import load_model, resolve_device
from teachdiag.pair import open_pair, read_inputs
from teachdiag.provenance import model_record
from teachdiag.config import (DEMO_POSITIONS, ContextOptions, DeviceOptions, PairOptions, StepOptions,
                              check_positive, fill_embedded, parse_lr)
from teachdiag.flags import opt
from teachdiag.probe.exact import parse_params, select_params
from teachdiag.progress import progress
from teachdiag.runfolder import releases_locks
from teachdiag.runtable import RunWriter
from teachdiag.table import RUN

PAPER = "arXiv:2605.26844, Not All Disagreement Is Learnable: Token Teachability in On-Policy Distillation"


@dataclass
class ProbeConfig(DeviceOptions, StepOptions, ContextOptions, PairOptions):  # listed last-shown first
    """Options of `teachdiag probe` (each field's help is its --help text)."""

    out: str = opt("run folder for tokens.csv and run.json [default: runs/<date-time>]", "", show_default=False)
    gain: str = opt("instrument (DESIGN.md): per_position: one step on each position's own loss, a fresh θ1 "
                    "per position; shared: ONE step on the mean loss of all probed positions (or of each "
                    "--shared-batch of contexts), every position re-scored (the paper's Proposition 1)",
                    "per_position", choices=["per_position", "shared"])
    shared_batch: int = opt("--gain shared: contexts per shared step (0: one step for all probed positions)", 0)
    skip_first_order: bool = opt("--gain shared: skip gain_first_order (a forward-mode pass per context, "
                                 "~1/3 of the time)", False)
    student_after: str = opt("checkpoint gain: a second student (θτ, e.g. after `teachdiag train` or your own "
                             "OPD run) scored on the same contexts; gains are θ0 → θτ, no step taken", "")
    mode: str = opt("exact: take the step and measure; linear: first-order gains lr·⟨g, d⟩ only "
                    "(no step, *_after columns empty), batched", "exact", choices=["exact", "linear"])
    batch: int = opt("positions per forward/backward in --mode linear (reduce if you run out of memory)", 16)
    signals: str = opt("where topk_entropy, union_fkl and compat_mass come from: full (full distributions), "
                       "topk (each side's top-K log-probabilities only, as a served teacher returns them; C "
                       "exact, the teacher asked at the student's ids) or topk_lb (C from the teacher's own "
                       "top-K only, a lower bound)", "full", choices=list(SIGNAL_MODES))
    auto_lr_positions: int = opt("positions swept by --lr auto (one backward + 10 forwards each)", 64)
    teacher_device_map: str = opt("'auto': spread a teacher too big for one GPU over all visible GPUs "
                                  "(and CPU) with accelerate; '': all on --device", "", choices=["", "auto"])
    overwrite: bool = opt("replace an existing non-empty --out", False)
    resume: bool = opt("continue an interrupted run in --out (same options and models)", False)


# options that must match for --resume to continue a folder
RESUME_KEYS = ("teacher", "student", "contexts", "positions", "max_response_tokens", "top_k", "signals", "loss",
               "optimizer", "lr", "params", "mode", "seed", "dtype", "gain", "shared_batch", "student_after",
               "skip_first_order", "raw_text", "strict_tokenizer", "student_base", "teacher_base")


def resolve_defaults(cfg: ProbeConfig) -> ProbeConfig:
    """Fill the embedded pair, positions, lr and out the user left unset; check the numbers."""
    if fill_embedded(cfg):
        cfg.positions = cfg.positions or DEMO_POSITIONS
    cfg.positions = cfg.positions or "all"
    parse_positions(cfg.positions)
    cfg.lr = parse_lr(cfg.lr, cfg.optimizer)
    if cfg.loss not in LOSSES:  # the CLI's choices say so; the Python API lands here
        raise InputError(f"unknown loss {cfg.loss!r}; one of {', '.join(LOSSES)}", field="--loss")
    check_positive(auto_lr_positions=cfg.auto_lr_positions, batch=cfg.batch, top_k=cfg.top_k)
    parse_params(cfg.params)
    if cfg.shared_batch < 0:
        raise InputError(f"must be >= 0, got {cfg.shared_batch}", field="--shared-batch")
    other = "--student-after" if cfg.student_after else "--gain shared" if cfg.gain == "shared" else ""
    if other and cfg.mode != "exact":
        raise InputError(f"--mode linear is a per-position instrument; not with {other}", field="--mode")
    if other and cfg.lr == "auto":
        raise InputError(f"--lr auto calibrates the per-position step; give a number with {other}", field="--lr")
    if cfg.student_after and cfg.gain == "shared":
        raise InputError("choose one instrument: --gain shared or --student-after", field="--student-after")
    cfg.out = cfg.out or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return cfg


def _auto_lr(cfg: ProbeConfig, writer: RunWriter, teacher, student, ctxs: list[Context], vocab: int,
             device: torch.device, rank: int, keep: torch.Tensor | None) -> tuple[float, dict | None]:
    """--lr auto: the lr `teachdiag calibrate` would choose, found once (rank 0, then shared) and
    kept by --resume from the run record, so a resumed run steps with the same lr."""
    if cfg.resume and (writer.out / RUN).is_file():
        try:
            old = json.loads((writer.out / RUN).read_text())["step"]
            return float(old["lr"]), old.get("lr_auto")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # RunWriter.check_resume reports the broken record

    lr, summary = float("nan"), None
    if rank == 0:
        lr, summary = auto_lr(teacher, student, ctxs, vocab, loss=cfg.loss, optimizer=cfg.optimizer,
                              params=cfg.params, seed=cfg.seed, positions=cfg.auto_lr_positions,
                              device=device, quiet=cfg.quiet, keep=keep)
    lr = distributed.broadcast_float(lr)  # GPU ranks could otherwise round to different choices
    info = None if summary is None else {"rule": RULE, "positions": cfg.auto_lr_positions,
                                         "summary": json.loads(summary.to_json(orient="records"))}
    return lr, info


def _versions() -> dict:
    import numpy, pandas, scipy, transformers  # noqa: E401

    return {"teachdiag": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "pandas": pandas.__version__, "scipy": scipy.__version__, "platform": platform.platform()}


def instrument_kind(cfg: ProbeConfig) -> str:
    """Which instrument the flags ask for (probe/instruments.INSTRUMENTS)."""
    if cfg.student_after:
        return "checkpoint"
    if cfg.gain == "shared":
        return "shared"
    return "linear" if cfg.mode == "linear" else "per_position"


def _instrument(cfg: ProbeConfig, student, lr: float, vocab: int, device, world: int, out: Path,
                keep: torch.Tensor | None):
    """The instrument the flags ask for, built from plain values (the config stops here). keep:
    the ids both tokenizers agree on, or None (probe/signals.py)."""
    kind = instrument_kind(cfg)
    extra: dict = {}
    if kind == "checkpoint":
        after = load_model(cfg.student_after, "student-after", "float32", device, cfg.trust_remote_code)
        # same class, same parameter names and shapes: two states of one model. Not a config hash:
        # trainers save runtime fields (use_cache, pad_token_id) that say nothing about the weights
        shapes = lambda m: {n: tuple(p.shape) for n, p in m.state_dict().items()}  # noqa: E731
        if type(after) is not type(student) or shapes(after) != shapes(student):
            raise InputError(f"its architecture differs from --student's ({type(after).__name__} vs "
                             f"{type(student).__name__}, or other parameter shapes); a checkpoint gain compares "
                             "two states of one model", field="--student-after")
        extra = {"after": after, "after_record": model_record(cfg.student_after, after, "float32")}
    if kind == "shared" and world > 1:
        raise InputError("the shared step needs every position's gradient in one process; run it "
                         "without torchrun", field="--gain")
    return make_instrument(kind, student=student, params=cfg.params, loss=cfg.loss, optimizer=cfg.optimizer,
                           lr=lr, vocab=vocab, top_k=cfg.top_k, keep=keep, signals=cfg.signals, batch=cfg.batch,
                           shared_batch=cfg.shared_batch, first_order=not cfg.skip_first_order,
                           cache_dir=str(out), resume=cfg.resume, **extra)


@releases_locks  # the folder lock it takes is let go when it ends, however
def run_probe(cfg: ProbeConfig, argv: list[str] | None = None) -> Path:
    """Run the probe; returns the run folder. Raises InputError on bad input.

    Under torchrun every rank calls this with the same options (distributed.py)."""
    t_start = time.time()
    if distributed.world()[1] > 1 and not cfg.out:  # a default runs/<time> could differ between ranks
        raise InputError("give --out when running under torchrun (all ranks share one folder)", field="--out")
    rank, world, local_rank = distributed.init()
    cfg = resolve_defaults(cfg)
    device = distributed.rank_device(resolve_device(cfg.device), local_rank, world)
    inputs = read_inputs(cfg)
    writer = RunWriter(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, rank=rank)
    pair = open_pair(cfg, device, inputs)
    teacher, student, ctxs, s_tok, vocab, keep = (pair.teacher, pair.student, pair.contexts, pair.tokenizer,
                                                  pair.vocab, pair.keep)  # keep None: identical tokenizers
    n_stepped = sum(p.numel() for _, p in select_params(student, cfg.params))  # before --lr auto sweeps
    lr, lr_auto = (cfg.lr, None) if cfg.lr != "auto" else _auto_lr(cfg, writer, teacher, student, ctxs,
                                                                    vocab, device, rank, keep)
    inst = _instrument(cfg, student, lr, vocab, device, world, writer.out, keep)
    picks = select_positions(ctxs, parse_positions(cfg.positions), cfg.seed)
    by_ctx = by_context(picks)

    record = {"teachdiag": __version__, "cite": PAPER,
              **pair.header("probe", argv, asdict(cfg))}
    record["contexts"]["n_positions_available"] = sum(len(c.response_ids) for c in ctxs)
    record.update({
        "world_size": world,
        "positions": {"requested": cfg.positions, "probed": len(picks)},
        "step": {"loss": cfg.loss, "optimizer": cfg.optimizer, "lr": lr, "params": cfg.params,
                 "n_stepped_params": n_stepped, "student_compute_dtype": "float32", "mode": cfg.mode,
                 "instrument": inst.name, **inst.record(), **({"lr_auto": lr_auto} if lr_auto else {})},
        "top_k": cfg.top_k, "signals": cfg.signals, "seed": cfg.seed, "versions": _versions(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    done: set[str] = set()
    if cfg.resume:
        writer.check_resume(record, RESUME_KEYS, lambda r: {"teacher": r["teacher"], "student": r["student"],
                                                            "student-after": r["step"].get("after")},
                            added={"signals": "full"})  # runs before --signals: full distributions
        if rank == 0:
            writer.repair()
        distributed.barrier()  # every rank reads the repaired parts
        done = writer.done_contexts()
    distributed.barrier()  # nobody reads run.json or the parts while rank 0 rewrites them
    if rank == 0:
        writer.start(record)
    distributed.barrier()  # and nobody appends before an --overwrite has cleared the folder

    # the work left, in file order, and this rank's share of it
    todo = distributed.shard([c for c in by_ctx if ctxs[c].id not in done], rank, world)
    groups, left = inst.groups(by_ctx, todo), set(todo)
    t_probe = time.time()
    bar = progress(inst.work(by_ctx, groups), "probe" if world == 1 else f"probe (rank 0 of {world})", "pos",
                   quiet=cfg.quiet or rank != 0)
    advance = lambda n, phase: (bar.set_postfix_str(phase, refresh=False), bar.update(n))  # noqa: E731
    try:
        for group in groups:
            results = inst.run(teacher, ctxs, by_ctx, group, device, advance)
            for c in [c for c in group if c in left]:  # a shared group also steps with finished contexts
                ctx = ctxs[c]
                writer.append_context(ctx.id, label_rows(results[c], ctx, by_ctx[c], s_tok.decode, inst.name))
    except UnsupportedModel as exc:  # found on the first context; finished contexts stay saved
        bar.close()
        exc.message += " (finished contexts are saved in the run folder)"
        raise
    except KeyboardInterrupt:
        bar.close()
        writer.repair(own_only=True)
        if rank == 0:
            writer.write_record(dict(record, complete=False, interrupted=True))
        raise
    bar.close()
    distributed.barrier()  # every rank's part is complete
    if rank == 0:
        wall, probe_s = time.time() - t_start, time.time() - t_probe
        n_new = sum(len(by_ctx[c]) for c in by_ctx if ctxs[c].id not in done)  # every rank's share
        record.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      wall_s=round(wall, 3), probe_s=round(probe_s, 3),
                      positions_per_s=round(n_new / max(probe_s, 1e-9), 4))
        writer.finish(record, order=[ctxs[c].id for c in by_ctx])
        if lr_auto:  # the sweep that chose the lr, drawn beside the table (CLI and Python API alike)
            _draw_lr_auto(cfg, writer.out, lr, lr_auto, writer.output.write)
    distributed.barrier()  # the other ranks return once tokens.csv exists
    distributed.close()
    return writer.out


def _draw_lr_auto(cfg: ProbeConfig, out: Path, lr: float, lr_auto: dict, write) -> None:
    """calibration.png/.pdf: the --lr auto sweep's median gain/first-order ratio per lr, the chosen lr marked;
    each file through `write` (the run output's: whole or not at all)."""
    import pandas as pd

    from teachdiag.analysis import plots

    fig = plots.calibration(pd.DataFrame(lr_auto["summary"]), lr,
                            f"--lr auto for {cfg.student}: loss {cfg.loss}, step {cfg.optimizer}",
                            band=BAND, max_negative=MAX_NEGATIVE)
    plots.save(fig, out, "calibration", write)


def summary_lines(out: Path) -> list[str]:
    """Where the files are, three lines on what the run shows, and the command to run next."""
    from scipy.stats import spearmanr

    from teachdiag.table import TOKENS, read_tokens

    df = read_tokens(out / TOKENS)
    ok = df[df["finite"] == 1]
    rho = lambda a, b: spearmanr(ok[a], ok[b], nan_policy="omit")[0] if len(ok) > 2 else float("nan")  # noqa: E731
    gain = "rel_gain_fkl"  # the paper's gain: relative forward-KL drop ...
    if ok[gain].isna().all():  # ... not measured by --mode linear: its first-order prediction
        gain = "gain_first_order"
    return [f"wrote {out / TOKENS} and {out / RUN}",
            f"positions: {len(df)} ({len(df) - len(ok)} non-finite, excluded)",
            f"median fkl: {ok['fkl'].median():.4f} nats (mean {ok['fkl'].mean():.4f})",
            f"Spearman({gain}, fkl) = {rho(gain, 'fkl'):+.3f}; "
            f"Spearman({gain}, teachability) = {rho(gain, 'teachability'):+.3f}",
            f"next: teachdiag analyze {out}"]  # the step after, as `teachdiag viability` ends
