"""`teachdiag probe`: contexts → signals → single-step probe → tokens.csv + run.json.

    from teachdiag.runner import ProbeConfig, run_probe
    run_probe(ProbeConfig(teacher="T", student="S", contexts="rollouts.jsonl", out="runs/r1"))

The teacher runs once per context (every probed position from one forward); the student is
probed position by position (probe.py). Rows are saved per finished context, so a run that
dies keeps its work and `--resume` continues it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from teachdiag import __version__, distributed, zoo
from teachdiag.batching import exact_group, groups, linear_group
from teachdiag.contexts import Context, by_context, parse_positions, select_positions
from teachdiag.errors import InputError
from teachdiag.fastprobe import make_probe
from teachdiag.models import config_sha256, load_inputs, load_models, resolve_device, vocab_rows
from teachdiag.probe import select_params
from teachdiag.table import COLUMNS, RUN, RunWriter, all_parts

PAPER = "arXiv:2605.26844, Not All Disagreement Is Learnable: Token Teachability in On-Policy Distillation"


def _h(text: str, **kw) -> dict:
    return {"metadata": {"help": text, **kw}}


@dataclass
class ProbeConfig:
    teacher: str = field(default="", **_h("teacher model: local folder, HF id or short name (default: the embedded pair)"))
    student: str = field(default="", **_h("student model: local folder, HF id or short name (default: the embedded pair)"))
    contexts: str = field(default="", **_h("frozen rollouts, JSONL or Parquet (default: the demo rollouts)"))
    out: str = field(default="", **_h("run folder for tokens.csv and run.json (default: runs/<time>)"))
    positions: str = field(default="", **_h("'all', or N for a seeded uniform sample of N positions over the file"))
    max_response_tokens: int = field(default=0, **_h("truncate each response to M tokens (0: keep all; the paper used 192)"))
    top_k: int = field(default=16, **_h("K of the student's top-K for compat_mass, topk_entropy, union_fkl"))
    loss: str = field(default="reverse_kl", **_h("probe loss", choices=["reverse_kl", "forward_kl", "sampled_token"]))
    optimizer: str = field(default="normalized", **_h("step rule: θ1 = θ0 − lr·d with d = g, g/(|g|+1e-8), g/‖g‖",
                                                       choices=["sgd", "adam", "normalized"]))
    lr: str = field(default="", **_h("step size; empty: the step rule's default (README); 'auto': the largest lr "
                                     "in the linear regime on a seeded sample (as `teachdiag calibrate`)"))
    auto_lr_positions: int = field(default=64, **_h("positions swept by --lr auto (one backward + 10 forwards each)"))
    params: str = field(default="all", **_h("parameters the step touches: all, lm_head, last:N"))
    mode: str = field(default="exact", **_h("exact: take the step and measure; linear: first-order gains "
                                            "lr·⟨g, d⟩ only (no step, *_after columns empty), batched",
                                            choices=["exact", "linear"]))
    batch: int = field(default=16, **_h("positions per forward/backward in --mode linear (reduce if you OOM)"))
    seed: int = field(default=0, **_h("seed for position sampling"))
    device: str = field(default="auto", **_h("auto, cpu or cuda"))
    dtype: str = field(default="float32", **_h("teacher forward dtype; the student always steps in float32",
                                               choices=["float32", "bfloat16"]))
    teacher_device_map: str = field(default="", **_h("'auto': spread a teacher too big for one GPU over all "
                                                     "visible GPUs (and CPU) with accelerate; '': all on --device",
                                                     choices=["", "auto"]))
    trust_remote_code: bool = field(default=False, **_h("allow model folders that load their own code"))
    overwrite: bool = field(default=False, **_h("replace an existing non-empty --out"))
    resume: bool = field(default=False, **_h("continue an interrupted run in --out (same options and models)"))
    quiet: bool = field(default=False, **_h("no progress bar"))


# The embedded demo: what `teachdiag probe` runs with no models or contexts given.
DATA = Path(__file__).resolve().parent.parent / "data"
EMBEDDED = {"teacher": zoo.TEACHER, "student": zoo.STUDENT, "contexts": str(DATA / "demo_rollouts.jsonl"),
            "positions": "200"}  # ~6 min on 2 CPU cores; --positions all for all 51,600

# lr defaults per step rule; see README "Choosing the step" for how they were chosen
DEFAULT_LR = {"sgd": 1e-5, "adam": 1e-7, "normalized": 1e-3}
# options that must match for --resume to continue a folder
RESUME_KEYS = ("teacher", "student", "contexts", "positions", "max_response_tokens", "top_k", "loss",
               "optimizer", "lr", "params", "mode", "seed", "dtype")


def resolve_defaults(cfg: ProbeConfig) -> ProbeConfig:
    """Fill the embedded pair, positions, lr and out the user left unset."""
    embedded = not (cfg.teacher or cfg.student or cfg.contexts)
    if embedded:
        cfg.teacher, cfg.student, cfg.contexts = EMBEDDED["teacher"], EMBEDDED["student"], EMBEDDED["contexts"]
        cfg.positions = cfg.positions or EMBEDDED["positions"]
    elif not (cfg.teacher and cfg.student and cfg.contexts):
        raise InputError("give --teacher, --student and --contexts together (or none, for the demo)",
                         field="--teacher/--student/--contexts")
    cfg.positions = cfg.positions or "all"
    parse_positions(cfg.positions)
    cfg.lr = parse_lr(cfg.lr, cfg.optimizer)
    if cfg.auto_lr_positions < 1:
        raise InputError(f"must be >= 1, got {cfg.auto_lr_positions}", field="--auto-lr-positions")
    if cfg.batch < 1:
        raise InputError(f"must be >= 1, got {cfg.batch}", field="--batch")
    if cfg.top_k < 1:
        raise InputError(f"must be >= 1, got {cfg.top_k}", field="--top-k")
    cfg.out = cfg.out or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return cfg


def parse_lr(value: str | float, optimizer: str) -> float | str:
    """--lr as a positive float, 'auto', or the step rule's default when empty or 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        lr = float(value or 0) or DEFAULT_LR[optimizer]
    except ValueError:
        raise InputError(f"must be a number or 'auto', got {value!r}", field="--lr") from None
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"must be positive, got {lr}", field="--lr")
    return lr


def _auto_lr(cfg: ProbeConfig, writer: RunWriter, teacher, student, ctxs: list[Context], vocab: int,
             device: torch.device, rank: int) -> tuple[float, dict | None]:
    """--lr auto: the lr `teachdiag calibrate` would choose, found once (rank 0, then shared) and
    kept by --resume from the run record, so a resumed run steps with the same lr."""
    if cfg.resume and (writer.out / RUN).is_file():
        try:
            old = json.loads((writer.out / RUN).read_text())["step"]
            return float(old["lr"]), old.get("lr_auto")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # _check_resume reports the broken record
    from teachdiag.calibrate import RULE, auto_lr  # calibrate builds on this module

    lr, summary = float("nan"), None
    if rank == 0:
        lr, summary = auto_lr(teacher, student, ctxs, vocab, loss=cfg.loss, optimizer=cfg.optimizer,
                              params=cfg.params, seed=cfg.seed, positions=cfg.auto_lr_positions,
                              device=device, quiet=cfg.quiet)
    lr = distributed.broadcast_float(lr)  # GPU ranks could otherwise round to different choices
    info = None if summary is None else {"rule": RULE, "positions": cfg.auto_lr_positions,
                                         "summary": json.loads(summary.to_json(orient="records"))}
    return lr, info


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import numpy, pandas, scipy, transformers  # noqa: E401

    return {"teachdiag": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "pandas": pandas.__version__, "scipy": scipy.__version__, "platform": platform.platform()}


def _model_record(name: str, model, dtype: str) -> dict:
    return {"name": name, "path": zoo.resolve(name), "class": type(model).__name__,
            "config_sha256": config_sha256(model), "vocab_rows": vocab_rows(model), "dtype": dtype,
            "n_params": sum(p.numel() for p in model.parameters()),
            "tied_embeddings": model.get_output_embeddings().weight is model.get_input_embeddings().weight}


def _check_resume(writer: RunWriter, record: dict) -> None:
    old_path = writer.out / RUN
    if not old_path.exists():
        raise InputError("nothing to resume (no run.json)", field="--resume", file=str(writer.out))
    try:
        old = json.loads(old_path.read_text())
        old["options"], old["teacher"], old["student"], old["contexts"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise InputError("is not a teachdiag run record", field="--resume", file=str(old_path)) from None
    for key in RESUME_KEYS:
        if old["options"].get(key) != record["options"].get(key):
            raise InputError(f"option {key} differs from the run being resumed "
                             f"({old['options'].get(key)!r} vs {record['options'].get(key)!r})",
                             field="--resume", file=str(old_path))
    for who in ("teacher", "student"):
        if old[who]["config_sha256"] != record[who]["config_sha256"]:
            raise InputError(f"the {who} model differs from the run being resumed", field="--resume",
                             file=str(old_path))
    if old["contexts"]["sha256"] != record["contexts"]["sha256"]:
        raise InputError("the contexts file changed since the run began", field="--resume", file=str(old_path))
    for partial, _ in all_parts(writer.out):  # a part written by another version of the table
        if partial.is_file() and partial.stat().st_size > 0:
            with open(partial, encoding="utf-8", errors="replace") as f:
                if f.readline().rstrip("\n") != ",".join(COLUMNS):
                    raise InputError("its columns differ from this version's; start a new run",
                                     field="--resume", file=str(partial))
    if old.get("complete") is True:
        raise InputError("this run is already complete; nothing to resume", field="--resume",
                         file=str(old_path))


def run_probe(cfg: ProbeConfig, argv: list[str] | None = None) -> Path:
    """Run the probe; returns the run folder. Raises InputError on bad input.

    Under torchrun every rank calls this with the same options (distributed.py)."""
    t_start = time.time()
    if distributed.world()[1] > 1 and not cfg.out:  # a default runs/<time> could differ between ranks
        raise InputError("give --out when running under torchrun (all ranks share one folder)", field="--out")
    rank, world, local_rank = distributed.init()
    cfg = resolve_defaults(cfg)
    device = distributed.rank_device(resolve_device(cfg.device), local_rank, world)
    ctxs, s_tok, fingerprint = load_inputs(cfg)
    writer = RunWriter(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, rank=rank)
    teacher, student = load_models(cfg, device, ctxs, len(s_tok))
    vocab = len(s_tok)
    try:  # --params is checked before --lr auto sweeps with it
        n_stepped = sum(p.numel() for _, p in select_params(student, cfg.params))
        lr, lr_auto = (cfg.lr, None) if cfg.lr != "auto" else _auto_lr(cfg, writer, teacher, student, ctxs,
                                                                        vocab, device, rank)
        probe = (make_probe(student, cfg.params, cfg.loss, cfg.optimizer, lr, vocab, cfg.top_k)
                 if cfg.mode == "exact" else None)
    except ValueError as exc:
        raise InputError(str(exc), field="--params") from None
    picks = select_positions(ctxs, parse_positions(cfg.positions), cfg.seed)
    by_ctx = by_context(picks)

    record = {
        "teachdiag": __version__, "cite": PAPER,
        "command": " ".join(["teachdiag", "probe", *(argv if argv is not None else sys.argv[2:])]),
        "options": asdict(cfg), "device": str(device), "world_size": world,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU, {torch.get_num_threads()} torch threads"),
        "teacher": _model_record(cfg.teacher, teacher, cfg.dtype),
        "student": _model_record(cfg.student, student, "float32"),
        "tokenizer": {"fingerprint": fingerprint, "vocab": vocab},
        "contexts": {"path": str(cfg.contexts), "sha256": _file_sha256(cfg.contexts), "n_contexts": len(ctxs),
                     "n_positions_available": sum(len(c.response_ids) for c in ctxs)},
        "positions": {"requested": cfg.positions, "probed": len(picks)},
        "step": {"loss": cfg.loss, "optimizer": cfg.optimizer, "lr": lr, "params": cfg.params,
                 "n_stepped_params": n_stepped, "student_compute_dtype": "float32", "mode": cfg.mode,
                 "probe": type(probe).__name__ if probe else "first_order_rows", **({"lr_auto": lr_auto} if lr_auto else {})},
        "top_k": cfg.top_k, "seed": cfg.seed, "versions": _versions(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    done: set[str] = set()
    if cfg.resume:
        _check_resume(writer, record)
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
    n_todo = sum(len(by_ctx[c]) for c in todo)
    t_probe = time.time()
    bar = tqdm(total=n_todo, unit="pos", desc="probe" if world == 1 else f"probe (rank 0 of {world})",
               disable=cfg.quiet or rank != 0, file=sys.stderr)
    # exact: one context at a time; linear: consecutive contexts until a batch is full
    try:
        for group in groups(todo, by_ctx, cfg.batch if cfg.mode == "linear" else 1):
            results = (exact_group(probe, teacher, ctxs, group, by_ctx, vocab, device) if probe else
                       linear_group(cfg, student, lr, teacher, ctxs, group, by_ctx, vocab, device))
            for c, rows in zip(group, results):
                ctx = ctxs[c]
                for j, row in zip(by_ctx[c], rows):
                    tok = ctx.response_ids[j]
                    row.update(context_id=ctx.id, position=j, token_id=tok, token=s_tok.decode([tok]))
                writer.append_context(ctx.id, rows)
                bar.update(len(rows))
    except ValueError as exc:  # a model the fast probe cannot handle; finished contexts stay saved
        bar.close()
        raise InputError(f"{exc} (finished contexts are saved in the run folder)",
                         field="--mode" if cfg.mode == "linear" else "--params") from None
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
    distributed.barrier()  # the other ranks return once tokens.csv exists
    distributed.close()
    return writer.out


def summary_lines(out: Path) -> list[str]:
    """Where the files are, and three lines on what the run shows."""
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
            f"Spearman({gain}, teachability) = {rho(gain, 'teachability'):+.3f}"]
