"""`teachdiag train`: a small, honest OPD trainer that makes θτ for the checkpoint gain and tests selectors.

    teachdiag train --steps 20 --out ckpt/ --select teachability --budget 0.05        # embedded demo pair
    teachdiag train --teacher T --student S --contexts train.jsonl --out ckpt/ --steps 200 --lr 1e-6
    teachdiag train --loss clipped_fkl --position-weight --select all --out ckpt/     # PW-OPSD's recipe
    teachdiag probe --student S --student-after ckpt/model --teacher T --contexts heldout.jsonl --out runs/g

Each step takes `--batch` contexts (a seeded shuffle, cycled), scores every response position with
the teacher and the student, keeps the positions the selector picks over the whole batch
(scores.keep_positions: the released TA-OPD rule, max(1, ceil(budget·N)) and at least one per sample), and takes one
AdamW step on the OPD loss of the kept positions, normalised by their number (DESIGN "The trainer
and the selectors"). Unselected tokens stay in the context.
With --position-weight (PW-OPSD, arXiv 2605.21606) each kept loss is weighted by its position's
w_t (scores.position_weight) and the batch loss is the paper's: per sequence Σ_t w_t ℓ_t / L_b, its
response length, then the mean over the sequences with a kept position. The paper trains with
--loss clipped_fkl (signals.clipped_fkl) on every position; here any loss and selector combine.
Defaults are the paper's training recipe (DESIGN "The trainer and the selectors"): sampled-token loss, lr 1e-6 constant, betas
(0.9, 0.98), weight decay 0.1. Contexts are frozen by default (the rollouts do not change as the
student does; cheap on a CPU). With --on-policy each step samples fresh responses from the current
student for `--batch` records of --prompts (seeded per step, as `teachdiag rollout` samples), which
is OPD proper: the trained-on tokens are the student's own.

Writes to --out: model/ (a loadable folder with the tokenizer, float32 unless --save-dtype bfloat16;
model/train_state/ holds the AdamW state and the train record of those very weights, and their
float32 copy when model/ is bf16, for --resume), saved every --save-every steps and at the last,
train_log.csv (one row a step: loss, kept and total positions, mean fkl of the batch before the
step, seconds) and train.json, the run record (the run header with both models' weight hashes,
options, versions; steps_done and "complete"): written with "complete": false before the first
step, again at every save (the saved set's record), "complete": true with the last. Every file
goes through the run output (runfolder.RunOutput): log rows appended and fsynced, the set swapped
in whole.
A save needs two sets on disk for a moment (about 24 bytes a parameter in float32; checked
before the first step), so that a kill at any point leaves a complete one.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from teachdiag import __version__
from teachdiag.config import (EMBEDDED, ContextOptions, DeviceOptions, PairOptions, check_positive, fill_embedded,
                              require)
from teachdiag.contexts import Context, encode_prompt
from teachdiag.demo import DEMO_PROMPTS
from teachdiag.errors import InputError
from teachdiag.flags import opt
from teachdiag.generation import generate_batch, read_prompts, stop_ids
from teachdiag.models import load_model, resolve_device
from teachdiag.pair import open_pair, read_inputs
from teachdiag.probe.signals import SIGNAL_MODES
from teachdiag.progress import progress
from teachdiag.runfolder import RunOutput, releases_locks
from teachdiag.scores import KEEP_RULES, SELECTORS
from teachdiag.training import (MODEL, STATE, TRAIN_LOSSES, batches, checkpoint_bytes, load_master, load_optimizer,
                                recover_checkpoint, save_checkpoint, train_step)

LOG_COLUMNS = ["step", "loss", "kept", "positions", "mean_fkl", "seconds"]
# --save-dtype: auto is float32 because the student trains in float32 and model/ is read as θτ by
# `probe --student-after`: rounded to a bf16 source's grid, an update smaller than half an ulp
# (at lr 1e-6 most of them, for tens of steps) would put θτ back on θ0 and the gain with it
SAVE_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig(DeviceOptions, ContextOptions, PairOptions):  # --help lists pair, contexts, device first
    """Options of `teachdiag train` (each field's help is its --help text)."""

    out: str = opt("folder for model/, train_log.csv, train.json", "")
    steps: int = opt("optimizer steps", 20)
    batch: int = opt("contexts per step (the selector's budget is taken over all their positions)", 8)
    lr: float = opt("AdamW learning rate, constant (the paper: 1e-6)", 1e-6)
    loss: str = opt("OPD loss: sampled_token (policy-gradient form, the paper's), reverse_kl (full vocabulary) "
                    "or clipped_fkl (forward KL, each vocabulary entry capped at --kl-clip: OPSD / PW-OPSD)",
                    "sampled_token", choices=list(TRAIN_LOSSES))
    kl_clip: float = opt("clipped_fkl: cap on each entry p_T(v)·(log p_T(v) − log p_S(v)) before the sum over v",
                         0.05)
    loss_temperature: float = opt("clipped_fkl: both logits are divided by it before the softmax (PW-OPSD: 1.1)",
                                  1.0)
    position_weight: bool = opt("PW-OPSD: weight position t of a length-L response by w_t = pw_min + "
                                "(1 − pw_min)·σ(((t + 0.5)/L − pw_tau)/pw_scale); batch loss = mean over "
                                "sequences of Σ w_t ℓ_t / L (the paper: --loss clipped_fkl --position-weight "
                                "--select all)", False)
    pw_min: float = opt("--position-weight: the weight the earliest positions tend to, w_min in [0, 1]", 0.25)
    pw_tau: float = opt("--position-weight: the share of the response where the weight is halfway up", 0.30)
    pw_scale: float = opt("--position-weight: width of the sigmoid, in shares of the response (0: a step)", 0.10)
    select: str = opt("which positions to train on: all, or a selector over the batch (selectors.py)", "all",
                      choices=list(SELECTORS))
    budget: float = opt("share of the batch's positions kept by --select (at least one per sample)", 0.05)
    select_rule: str = opt("how --select keeps positions: released (the authors' TA-OPD code: ceil(ρ·N) of the "
                           "batch by score, then a sample left empty gets its best by H̃ ∨ norm(D·C)) or "
                           "paper_text (teachdiag ≤ 0.2: round(ρ·N), each sample's best first)", "released",
                           choices=list(KEEP_RULES))
    select_signals: str = opt("where the selector's H, D, C come from: topk (each side's top-K lists, as a "
                              "served teacher returns them, C exact), topk_lb (C from the teacher's list "
                              "only) or full (full distributions, teachdiag ≤ 0.2)", "topk",
                              choices=list(SIGNAL_MODES))
    top_k: int = opt("K of the selector's top-K scores", 16)
    beta1: float = opt("AdamW beta1", 0.9)
    beta2: float = opt("AdamW beta2", 0.98)
    weight_decay: float = opt("AdamW decoupled weight decay", 0.1)
    on_policy: bool = opt("sample fresh student responses each step from --prompts (instead of frozen --contexts)",
                          False)
    prompts: str = opt("prompt records for --on-policy (the `teachdiag rollout` format) [default on the demo: "
                       "its prompts]", "", show_default=False)
    max_new_tokens: int = opt("--on-policy: longest sampled response, in tokens", 192)
    temperature: float = opt("--on-policy: sampling temperature (1.0: the student's own distribution)", 1.0)
    save_every: int = opt("steps between saves of model/ (the last step is always saved; 0: only the last). "
                          "A killed run resumes from its last save: 1 loses no finished step, for one save "
                          "(about 12 bytes a parameter written) a step", 10)
    save_dtype: str = opt("dtype of model/'s weights: auto (float32, the trained weights exactly, whatever the "
                          "student's dtype on disk: a bf16 copy rounds lr-1e-6 updates back to θ0), float32, or "
                          "bfloat16 (a copy half the size; train_state/ then keeps the float32 weights for "
                          "--resume)", "auto", choices=list(SAVE_DTYPES))
    resume: bool = opt("continue the run in --out from its last saved step", False)
    overwrite: bool = opt("replace an existing non-empty --out", False)


def _fill_on_policy(cfg: TrainConfig) -> None:
    """--on-policy needs models and prompts, not contexts; none of the three given: the demo pair."""
    if cfg.contexts:
        raise InputError("--on-policy samples its own responses; give --prompts, not --contexts", field="--contexts")
    if not (cfg.teacher or cfg.student):
        cfg.teacher, cfg.student = EMBEDDED["teacher"], EMBEDDED["student"]
        cfg.prompts = cfg.prompts or str(DEMO_PROMPTS)
    if not (cfg.teacher and cfg.student and cfg.prompts):
        raise InputError("give --teacher, --student and --prompts with --on-policy (or none, for the demo)",
                         field="--prompts")


class OnPolicy:
    """Fresh responses of the current student to a batch of prompt records, as frozen-context objects."""

    def __init__(self, cfg: TrainConfig, tok, student) -> None:
        self.cfg, self.student = cfg, student
        self.prompts = read_prompts(cfg.prompts)
        where = {"file": cfg.prompts}
        self.ids = [encode_prompt(tok, r["student"], line=r["line"], **where) for r in self.prompts]
        self.teacher_ids = [None if r["teacher"] is None else
                            encode_prompt(tok, r["teacher"], line=r["line"], field_name="teacher_prompt", **where)
                            for r in self.prompts]
        self.eos, self.pad = stop_ids(student, tok)
        self.vocab = len(tok)

    def sample(self, batch: list[int], step: int) -> list[Context]:
        outs = generate_batch(self.student, [self.ids[i] for i in batch], max_new_tokens=self.cfg.max_new_tokens,
                              temperature=self.cfg.temperature, top_p=1.0, eos_ids=self.eos, pad_id=self.pad,
                              seed=self.cfg.seed + step, vocab=self.vocab)
        return [Context(f"{self.prompts[i]['id']}@{step}", self.ids[i], response, self.teacher_ids[i])
                for i, (response, _) in zip(batch, outs)]


def make_optimizer(student, cfg: TrainConfig) -> torch.optim.AdamW:
    student.requires_grad_(True)
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, eps=1e-8)


def _saves_at(steps_done: int, cfg: TrainConfig) -> bool:
    """Whether the step that makes `steps_done` is saved: every --save-every, and the last."""
    return steps_done == cfg.steps or (cfg.save_every > 0 and steps_done % cfg.save_every == 0)


def _check_disk(out: Path, student, dtype: torch.dtype, start: int, cfg: TrainConfig) -> None:
    """Refuse now, not at a save hours in, a disk that cannot hold what the saves need at their peak:
    each save writes the next set beside the last (training.save_checkpoint), so the first needs
    one set free and, once it has replaced what --out held (a resumed run's set), each later one
    needs one more."""
    one = checkpoint_bytes(student, dtype)
    saves = sum(_saves_at(s, cfg) for s in range(start + 1, cfg.steps + 1))
    have = sum(f.stat().st_size for f in (out / MODEL).rglob("*") if f.is_file()) if (out / MODEL).is_dir() else 0
    need = one if saves == 1 else 2 * one - have
    free = shutil.disk_usage(out).free
    if saves and free < need:
        raise InputError(f"{need / 1e9:.1f} GB free needed for the checkpoints ({one / 1e9:.1f} GB a set; a save "
                         f"writes the next set beside the last), {free / 1e9:.1f} GB free", field="--out",
                         file=str(out))


LOG = "train_log.csv"


def _truncate_log(output: RunOutput, steps: int) -> None:
    """Keep the header and the first `steps` rows of train_log.csv."""
    path = output.path(LOG)
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else [",".join(LOG_COLUMNS) + "\n"]
    output.write(LOG, "".join(lines[: steps + 1]))


def _saved_steps(output: RunOutput) -> int | None:
    """steps_done of the run record (train.json), None when unreadable; 0 without one. A record written
    before the first step says 0: such a run saved nothing and a --resume may start it again."""
    try:
        record = output.previous()
        return 0 if record is None else int(record["steps_done"])
    except (InputError, KeyError, TypeError, ValueError):
        return None


def _check(cfg: TrainConfig) -> None:
    """Options torch would only refuse after the models have loaded, or not at all."""
    require([(cfg.lr > 0, "--lr", f"must be > 0, got {cfg.lr}"),
             (0 <= cfg.beta1 < 1, "--beta1", f"must be in [0, 1), got {cfg.beta1}"),
             (0 <= cfg.beta2 < 1, "--beta2", f"must be in [0, 1), got {cfg.beta2}"),
             (cfg.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {cfg.weight_decay}"),
             (cfg.temperature >= 0, "--temperature", f"must be >= 0 (0: greedy), got {cfg.temperature}"),
             (0 < cfg.budget <= 1, "--budget", f"must be in (0, 1], got {cfg.budget}"),
             (cfg.loss in TRAIN_LOSSES, "--loss", f"must be one of {', '.join(TRAIN_LOSSES)}, got {cfg.loss!r}"),
             (cfg.save_every >= 0, "--save-every", f"must be >= 0 (0: only the last step), got {cfg.save_every}"),
             (cfg.save_dtype in SAVE_DTYPES, "--save-dtype", f"must be one of {', '.join(SAVE_DTYPES)}, got "
                                                             f"{cfg.save_dtype!r}"),
             (cfg.kl_clip > 0, "--kl-clip", f"must be > 0 (inf: no cap), got {cfg.kl_clip}"),
             (0 < cfg.loss_temperature < math.inf, "--loss-temperature", f"must be > 0, got {cfg.loss_temperature}"),
             (0 <= cfg.pw_min <= 1, "--pw-min", f"must be in [0, 1], got {cfg.pw_min}"),
             (math.isfinite(cfg.pw_tau), "--pw-tau", f"must be a number, got {cfg.pw_tau}"),
             (0 <= cfg.pw_scale < math.inf, "--pw-scale", f"must be >= 0, got {cfg.pw_scale}")])
    # an option of a loss or reduction not in use would be silently ignored: refuse it instead
    default = TrainConfig()
    require([(getattr(cfg, name) == getattr(default, name) or used, "--" + name.replace("_", "-"),
              f"applies only with {what}, got {getattr(cfg, name)}")
             for names, used, what in ((("kl_clip", "loss_temperature"), cfg.loss == "clipped_fkl",
                                        "--loss clipped_fkl"),
                                       (("pw_min", "pw_tau", "pw_scale"), cfg.position_weight, "--position-weight"),
                                       (("select_rule", "select_signals"), cfg.select != "all", "a --select"))
             for name in names])


@releases_locks  # the folder lock it takes is let go when it ends, however
def run_train(cfg: TrainConfig, argv: list[str] | None = None) -> Path:
    """Train and save; returns the output folder. Raises InputError on bad input."""
    if cfg.on_policy:
        _fill_on_policy(cfg)
    else:
        fill_embedded(cfg)
    check_positive(steps=cfg.steps, batch=cfg.batch, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens)
    _check(cfg)
    if not cfg.out:
        raise InputError("give an output folder", field="--out")
    if cfg.positions:
        raise InputError("train uses every response position; choose with --select and --budget", field="--positions")
    device = resolve_device(cfg.device)
    inputs = read_inputs(cfg)  # a bad tokenizer pair or --top-k is refused before --out is made
    out = Path(cfg.out)
    output = RunOutput(out, "train.json", overwrite=cfg.overwrite, resume=cfg.resume)  # one trainer per folder, claimed
    # before anything in it is read
    pair = open_pair(cfg, device, inputs)
    teacher, student, ctxs, tok, vocab, keep = pair.teacher, pair.student, pair.contexts, pair.tokenizer, pair.vocab, pair.keep
    student.train(False)  # no dropout: the step is the OPD gradient, nothing random
    optimizer = make_optimizer(student, cfg)
    source = OnPolicy(cfg, tok, student) if cfg.on_policy else None
    plan = batches(len(source.prompts) if source else len(ctxs), min(cfg.batch, len(source.prompts) if source
                                                                      else len(ctxs)), cfg.steps, cfg.seed)
    start = 0
    log_path = output.path(LOG)
    saved = recover_checkpoint(output) if cfg.resume and out.is_dir() else None
    if saved is not None:
        before = asdict(TrainConfig()) | saved["options"]  # options added since that run: their defaults
        free = ("resume", "overwrite", "steps", "out", "quiet", "threads", "save_every",
                "save_dtype")  # where and how it runs, not what (resume reads the float32 weights either way)
        differ = [k for k in asdict(cfg) if k not in free and before.get(k) != getattr(cfg, k)]
        if differ:
            raise InputError("options differ from the run being resumed: " + ", ".join(
                f"{k} ({before.get(k)!r} vs {getattr(cfg, k)!r})" for k in differ), field="--resume", file=str(out))
        start = int(saved["steps_done"])
        _truncate_log(output, start)  # steps logged after the last save are taken again
        if not load_master(student, out / MODEL):  # no float32 master: model/'s weights are float32 themselves
            # safetensors only, never the hub (models.load_model): a pytorch_model.bin there would be unpickled
            weights = load_model(str((out / MODEL).resolve()), "resume", "float32", "cpu")
            student.load_state_dict(weights.state_dict())
            del weights
        load_optimizer(student, optimizer, out / MODEL / STATE / "optimizer.safetensors")
    else:
        if cfg.resume and (out / "optimizer.safetensors").is_file():
            raise InputError("saved by teachdiag 0.2, whose model/ and optimizer state can disagree after a kill; "
                             "start again with --overwrite (its selection rule is --select-rule paper_text "
                             "--select-signals full)", field="--resume", file=str(out))
        # a finished save left model/ and a train.json past step 0; an unfinished first save (model.tmp/
        # alone, train.json at step 0) lost nothing
        if cfg.resume and ((out / MODEL).exists() or _saved_steps(output) != 0):
            raise InputError("no complete saved step to resume from (a damaged model/ or train_state); "
                             "--overwrite starts again", field="--resume", file=str(out))
        # --overwrite: no stale set to resume, no record of another run; the last: a 0.2 folder's AdamW state
        output.remove(MODEL, MODEL + ".tmp", MODEL + ".old", "train.json", "optimizer.safetensors")
        output.write(LOG, ",".join(LOG_COLUMNS) + "\n")
    save_dtype = SAVE_DTYPES[cfg.save_dtype]
    _check_disk(out, student, save_dtype, start, cfg)
    record = {"teachdiag": __version__, **pair.header("train", argv, asdict(cfg)), "n_contexts": len(ctxs),
              "torch": torch.__version__, "save_dtype": str(save_dtype).removeprefix("torch."), "steps_done": start}
    output.start(record)  # "complete": false until the last step is saved
    bar = progress(cfg.steps, "train", "step", cfg.quiet, initial=start)
    for step in range(start, cfg.steps):
        t0 = time.time()
        ctxs, batch = (source.sample(plan[step], step), None) if source else (ctxs, plan[step])
        batch = batch if batch is not None else list(range(len(ctxs)))
        row = train_step(student, teacher, ctxs, batch, vocab, loss=cfg.loss, select=cfg.select,
                         budget=cfg.budget, top_k=cfg.top_k, optimizer=optimizer, device=device, seed=cfg.seed + step,
                         select_rule=cfg.select_rule, select_signals=cfg.select_signals,
                         keep=keep, kl_clip=cfg.kl_clip, loss_temperature=cfg.loss_temperature,
                         pw=(cfg.pw_min, cfg.pw_tau, cfg.pw_scale) if cfg.position_weight else None)
        optimizer.zero_grad(set_to_none=True)  # the gradient is spent: not held through the save
        row = {"step": step + 1, **row, "seconds": round(time.time() - t0, 3)}
        output.append(LOG, ",".join(str(row[c]) for c in LOG_COLUMNS) + "\n",  # on disk before any save
                      "the last save is kept; free space or fix permissions, then rerun with --resume")
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.4f}", fkl=f"{row['mean_fkl']:.3f}")
        if _saves_at(step + 1, cfg):  # a killed run resumes from the last save
            saved = dict(record, steps_done=step + 1)
            with output.faults("the last complete save is kept; free space or fix permissions, then rerun "
                               "with --resume"):
                save_checkpoint(output, student, tok, optimizer, saved, save_dtype)
                # the run record follows the set; the last save's is the last write: "complete": true
                output.write_record(dict(saved, complete=step + 1 == cfg.steps))
    bar.close()
    if start == cfg.steps:  # a finished run resumed: nothing was trained, the record is whole again
        output.finish(record)
    student.requires_grad_(False)
    print(f"wrote {out / 'model'} after {cfg.steps} steps, {log_path}", file=sys.stderr)
    return out
