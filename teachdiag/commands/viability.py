"""`teachdiag viability`: are the privileged teacher's tokens viable branches? (arXiv 2605.21606)

    teachdiag viability                          # the embedded self-distillation setting, 256 positions
    teachdiag viability --teacher T --student S --contexts rollouts.jsonl --positions 400 --out runs/v
    teachdiag analyze runs/v                     # AUROC of each predictor with context-clustered CIs

    from teachdiag.commands.viability import ViabilityConfig, run_viability
    out = run_viability(ViabilityConfig(positions="64", out="runs/v"))

In on-policy self-distillation the teacher is the student's own weights seeing a privileged
context (teacher_prompt_ids: the question with a worked solution). At each sampled position j of a
frozen rollout, the teacher's `--alternatives` most likely next tokens are forced, one at a time,
after the student's own view (prompt_ids + response_ids[:j]); the student continues greedily and
`--samples` times at `--temperature`, at most `--max-new-tokens` tokens, and a verifier reads the
answer off the response it ends with (branches.py). A branch is viable when that answer is the
record's `meta.answer`.

viability.csv has one row per (position, alternative): the alternative (rank, id, text, teacher
and student probability), every tokens.csv signal at the position (probe/signals.py; teachability
normalised over the run's positions), pos_norm = j/(T−1), and the labels viable_greedy (0/1) and
viable_sampled (share of the sampled continuations that are correct). run.json records the
protocol and the solve rate of the rollouts themselves. The run folder is crash-safe like probe's
(runtable.py): rows are appended per finished context and --resume carries on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from teachdiag import __version__
from teachdiag.branches import VERIFIERS, alternatives, answer_matches, continue_forced, final_answer, is_correct
from teachdiag.config import ContextOptions, DeviceOptions, PairOptions, check_positive, fill_embedded
from teachdiag.contexts import Context, by_context, parse_positions, select_positions
from teachdiag.demo import SELFDISTILL_MODEL, SELFDISTILL_ROLLOUTS
from teachdiag.errors import InputError
from teachdiag.flags import opt
from teachdiag.models import resolve_device
from teachdiag.pair import open_pair, read_inputs
from teachdiag.probe.forward import teacher_logits, view_logits
from teachdiag.probe.instruments import consecutive
from teachdiag.probe.signals import SIGNALS, signals_from_logits
from teachdiag.progress import progress
from teachdiag.generation import stop_ids
from teachdiag.runfolder import releases_locks
from teachdiag.runtable import RunWriter
from teachdiag.scores import teachability_scores
from teachdiag.table import RUN, VIABILITY as TABLE, VIABILITY_COLUMNS as COLUMNS, \
    VIABILITY_TEXT_COLUMNS as TEXT_COLUMNS, pos_norm, read_tokens
# the embedded self-distillation setting: teacher = student, the teacher seeing a worked solution
SELFDISTILL = {"teacher": SELFDISTILL_MODEL, "student": SELFDISTILL_MODEL, "contexts": str(SELFDISTILL_ROLLOUTS)}
PAPER = "Liu et al., When Are Teacher Tokens Reliable? Position-Weighted On-Policy Self-Distillation, arXiv 2605.21606"
# options a --resume must repeat: they fix the rows, and batch fixes the groups and so the samples
SAME_RUN = ("teacher", "student", "contexts", "positions", "max_response_tokens", "seed", "raw_text", "top_k",
            "alternatives", "max_new_tokens", "samples", "temperature", "verifier", "dtype", "batch")


@dataclass
class ViabilityConfig(DeviceOptions, ContextOptions, PairOptions):
    """Options of `teachdiag viability` (each field's help is its --help text)."""

    teacher: str = opt("privileged teacher: local folder, hub id or short name (none of teacher/student/contexts "
                       "given: the embedded self-distillation setting, SmolLM2-135M-Instruct teaching itself)", "")
    student: str = opt("student that continues each branch: local folder, hub id or short name (for "
                       "self-distillation, the teacher's own weights)", "")
    contexts: str = opt("frozen rollouts with teacher_prompt_ids and meta.answer, JSONL or Parquet (default: "
                        "the self-distillation demo's)", "")
    positions: str = opt("'all', or N for a seeded uniform sample of N positions over the file [default: all; "
                         "256 on the demo]", "", show_default=False)
    seed: int = opt("seed of the position sample and of the sampled continuations", 0)
    out: str = opt("run folder for viability.csv and run.json (default: runs/viability-<time>)", "")
    alternatives: int = opt("the privileged teacher's top-k next tokens forced at each position", 4)
    max_new_tokens: int = opt("longest continuation after the forced token, in tokens", 96)
    samples: int = opt("sampled continuations per branch, besides the greedy one (0: greedy only)", 1)
    temperature: float = opt("temperature of the sampled continuations [default: the one the rollouts were "
                             "sampled at (their meta.temperature), else 1.0]", -1.0, show_default=False)
    verifier: str = opt("how the answer is read: final_number (after the last 'answer is', else the last "
                        "number) or boxed (the last \\boxed{})", "final_number", choices=list(VERIFIERS))
    top_k: int = opt("K of the student's top-K for compat_mass, topk_entropy, union_fkl", 16)
    batch: int = opt("continuations generated together (left-padded), across contexts", 32)
    overwrite: bool = opt("replace an existing non-empty --out", False)
    resume: bool = opt("continue an interrupted run in --out (same options)", False)


def fill_defaults(cfg: ViabilityConfig) -> ViabilityConfig:
    """None of teacher/student/contexts: the embedded self-distillation setting (teacher = student =
    SmolLM2-135M-Instruct, the teacher seeing a worked solution), 256 positions, its temperature."""
    if fill_embedded(cfg, SELFDISTILL):
        cfg.positions = cfg.positions or "256"
    cfg.positions = cfg.positions or "all"
    if not cfg.out:
        cfg.out = str(Path("runs") / datetime.now().strftime("viability-%Y%m%d-%H%M%S"))
    check_positive(alternatives=cfg.alternatives, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k,
                   batch=cfg.batch)
    if cfg.samples < 0:
        raise InputError(f"must be 0 or more, got {cfg.samples}", field="--samples")
    if cfg.samples and cfg.temperature == 0:
        raise InputError("sampled continuations need a temperature above 0 (--samples 0 for greedy only)",
                         field="--temperature")
    return cfg


def rollout_temperature(ctxs: list[Context]) -> tuple[float, str]:
    """(temperature, where it came from): the one the rollouts were sampled at (meta.temperature,
    when every record gives the same value above 0), else 1.0, the student's own distribution."""
    found = {c.meta.get("temperature") if isinstance(c.meta, dict) else None for c in ctxs}
    t = next(iter(found)) if len(found) == 1 else None
    if isinstance(t, (int, float)) and t > 0:
        return float(t), "the rollouts' meta.temperature"
    return 1.0, f"1.0: the rollouts do not give one sampling temperature above 0 (found {sorted(map(str, found))[:3]})"


def answer_of(ctx: Context) -> str:
    """The record's answer (meta.answer: `teachdiag rollout` copies a prompt record's `answer` there)."""
    answer = ctx.meta.get("answer") if isinstance(ctx.meta, dict) else None
    if answer is None or str(answer).strip() == "":
        raise InputError("no answer to check branches against; give each record meta.answer",
                         file=ctx.file, line=ctx.line, field="meta.answer")
    return str(answer)


def prepare(cfg: ViabilityConfig, ctx: Context, positions: list[int], teacher: torch.nn.Module,
            student: torch.nn.Module, vocab: int, keep: torch.Tensor | None) -> dict:
    """One context's signals at `positions`, the teacher's alternatives there, and the branch prefixes."""
    device = next(student.parameters()).device
    t = teacher_logits(teacher, ctx, positions, vocab, device)  # (P, V), the privileged view
    z = view_logits(student, ctx.prompt_ids, ctx.response_ids, positions, vocab, device)  # (P, V), its own view
    y = torch.tensor([ctx.response_ids[j] for j in positions], device=z.device)
    sig = {k: v.tolist() for k, v in signals_from_logits(z, t, y, cfg.top_k, keep).items()}
    alt_ids, t_prob = alternatives(t, cfg.alternatives, keep)  # (P, k) each
    s_prob = torch.softmax(z.double(), -1).gather(-1, alt_ids)  # (P, k)
    branches = [(p, r) for p in range(len(positions)) for r in range(cfg.alternatives)]
    prefixes = [ctx.prompt_ids + ctx.response_ids[:positions[p]] + [int(alt_ids[p, r])] for p, r in branches]
    return {"ctx": ctx, "positions": positions, "sig": sig, "alt_ids": alt_ids.tolist(),
            "t_prob": t_prob.tolist(), "s_prob": s_prob.tolist(), "branches": branches, "prefixes": prefixes}


def rows_of(cfg: ViabilityConfig, prep: dict, greedy: list[tuple[list[int], str]],
            sampled: list[list[tuple[list[int], str]]], tok) -> list[dict]:
    """Every (position, alternative) row of one prepared context, from its continuations."""
    ctx, positions, sig = prep["ctx"], prep["positions"], prep["sig"]
    answer = answer_of(ctx)
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    spine = int(is_correct(text(ctx.response_ids), answer, cfg.verifier))
    rows = []
    for b, (p, r) in enumerate(prep["branches"]):
        j, a = positions[p], prep["alt_ids"][p][r]
        head = ctx.response_ids[:j] + [a]  # the spine's prefix and the forced token
        g_ids, g_finish = greedy[b]
        g_answer = final_answer(text(head + g_ids), cfg.verifier)  # read once: the label and the column
        ok = [is_correct(text(head + out[b][0]), answer, cfg.verifier) for out in sampled]
        row = {k: sig[k][p] for k in SIGNALS}
        row.update(context_id=ctx.id, position=j, response_length=len(ctx.response_ids),
                   pos_norm=float(pos_norm(j, len(ctx.response_ids))), token_id=ctx.response_ids[j],
                   token=tok.decode([ctx.response_ids[j]]), alt_rank=r + 1, alt_id=a, alt_token=tok.decode([a]),
                   is_sampled=int(a == ctx.response_ids[j]), teacher_prob=prep["t_prob"][p][r],
                   student_prob=prep["s_prob"][p][r], finite=int(all(np.isfinite(row[k]) for k in SIGNALS)),
                   viable_greedy=int(answer_matches(g_answer, answer)),
                   viable_sampled=float(np.mean(ok)) if ok else float("nan"),
                   greedy_answer="" if g_answer is None else g_answer, greedy_new_tokens=len(g_ids),
                   greedy_finish=g_finish, spine_correct=spine,
                   # the spine's prefix alone already reads as right: any branch that adds no number is "viable"
                   prefix_viable=int(is_correct(text(ctx.response_ids[:j]), answer, cfg.verifier)))
        rows.append(row)
    return rows


def groups(by_ctx: dict[int, list[int]], alternatives: int, batch: int) -> list[list[int]]:
    """Contexts in file order, cut into groups of at least `batch` branches (the last may be short):
    a group's continuations are generated together. Fixed by the run's positions alone, so a
    resumed run generates each group as the uninterrupted run did. n positions make n·alternatives
    branches, so "at least batch branches" is "at least ceil(batch / alternatives) positions"."""
    return consecutive(list(by_ctx), by_ctx, math.ceil(batch / alternatives))


def run_group(cfg: ViabilityConfig, group: list[int], g: int, ctxs: list[Context], by_ctx: dict[int, list[int]],
              teacher: torch.nn.Module, student: torch.nn.Module, tok, vocab: int, keep: torch.Tensor | None,
              eos_ids: list[int], pad_id: int) -> list[list[dict]]:
    """Rows of each context of group number `g`, its continuations generated in batches of --batch."""
    preps = [prepare(cfg, ctxs[c], by_ctx[c], teacher, student, vocab, keep) for c in group]
    prefixes = [p for prep in preps for p in prep["prefixes"]]
    kw = dict(max_new_tokens=cfg.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, vocab=vocab, batch_size=cfg.batch)
    greedy = continue_forced(student, prefixes, temperature=0.0, seed=0, **kw)
    # one seed per (group, sample): the same run gives the same samples however often it is resumed
    sampled = [continue_forced(student, prefixes, temperature=cfg.temperature,
                               seed=cfg.seed * 1_000_003 + g * 1_009 + s * 100_003, **kw)
               for s in range(cfg.samples)]
    out, a = [], 0
    for prep in preps:
        n = len(prep["prefixes"])
        out.append(rows_of(cfg, prep, greedy[a : a + n], [x[a : a + n] for x in sampled], tok))
        a += n
    return out


@releases_locks  # the folder lock it takes is let go when it ends, however
def run_viability(cfg: ViabilityConfig, argv: list[str] | None = None) -> Path:
    """Run the diagnostic; returns the run folder. Raises InputError on bad input."""
    t_start = time.time()
    cfg = fill_defaults(cfg)
    device = resolve_device(cfg.device)
    inputs = read_inputs(cfg)
    ctxs, tok, match = inputs
    temperature_source = "--temperature"
    if cfg.temperature < 0:
        cfg.temperature, temperature_source = rollout_temperature(ctxs)
    picks = select_positions(ctxs, parse_positions(cfg.positions), cfg.seed)
    by_ctx = by_context(picks)
    answers = [answer_of(ctx) for ctx in ctxs]  # every record, before any model loads
    writer = RunWriter(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, columns=COLUMNS,
                       text_columns=TEXT_COLUMNS, table=TABLE, key=("context_id", "position", "alt_rank"))
    vocab = match.vocab
    pair = open_pair(cfg, device, inputs)
    teacher, student, keep = pair.teacher, pair.student, pair.keep
    eos_ids, pad_id = stop_ids(student, tok)
    solved = [is_correct(tok.decode(c.response_ids, skip_special_tokens=True), a, cfg.verifier)
              for c, a in zip(ctxs, answers)]
    record = {"teachdiag": __version__, "cite": PAPER,
              **pair.header("viability", argv, asdict(cfg))}
    record["contexts"].update(solve_rate=float(np.mean(solved)) if solved else None, n_solved=int(np.sum(solved)))
    record.update({
        "positions": {"requested": cfg.positions, "probed": len(picks), "contexts_probed": len(by_ctx)},
        "protocol": {"alternatives": f"teacher's top-{cfg.alternatives} next tokens at its privileged view",
                     "continuation": f"student's view + forced token; greedy and {cfg.samples} sampled at "
                                     f"T={cfg.temperature}, at most {cfg.max_new_tokens} new tokens",
                     "temperature_from": temperature_source,
                     "label": f"verifier {cfg.verifier} on spine prefix + forced token + continuation"},
        "top_k": cfg.top_k, "seed": cfg.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    done: set[str] = set()
    if cfg.resume:
        writer.check_resume(record, SAME_RUN)
        writer.repair()
        done = writer.done_contexts()
    writer.start(record)
    todo = [(g, group) for g, group in enumerate(groups(by_ctx, cfg.alternatives, cfg.batch))
            if any(ctxs[c].id not in done for c in group)]
    n_branches = sum(len(by_ctx[c]) for _, group in todo for c in group) * cfg.alternatives
    bar = progress(n_branches, "viability", "branch", quiet=cfg.quiet)
    t_run = time.time()
    try:
        for g, group in todo:
            for c, rows in zip(group, run_group(cfg, group, g, ctxs, by_ctx, teacher, student, tok, vocab, keep,
                                                eos_ids, pad_id)):
                if ctxs[c].id not in done:  # a group cut by a crash is generated again whole
                    writer.append_context(ctxs[c].id, rows)
                bar.update(len(rows))
    except KeyboardInterrupt:
        bar.close()
        writer.repair(own_only=True)
        writer.write_record(dict(record, complete=False, interrupted=True))
        raise
    bar.close()
    df = writer.merged_rows([ctxs[c].id for c in by_ctx])
    df["teachability"], df["incompat"] = position_scores(df)
    run_s = time.time() - t_run
    record.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  wall_s=round(time.time() - t_start, 3), run_s=round(run_s, 3),
                  branches_per_s=round(n_branches / max(run_s, 1e-9), 4))
    writer.finish_table(record, df)
    return writer.out


def position_scores(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """teachability and incompat of every row, normalised over the run's finite positions (each
    position once, whatever its number of alternatives)."""
    first = ~df.duplicated(["context_id", "position"]) & (df["finite"] == 1)
    pos = df.loc[first, ["context_id", "position", "union_fkl", "compat_mass"]].copy()
    pos["teachability"], pos["incompat"] = teachability_scores(pos["union_fkl"].to_numpy(),
                                                               pos["compat_mass"].to_numpy())
    merged = df[["context_id", "position"]].merge(pos.drop(columns=["union_fkl", "compat_mass"]),
                                                  on=["context_id", "position"], how="left")
    return merged["teachability"].to_numpy(), merged["incompat"].to_numpy()


def summary_lines(out: Path) -> list[str]:
    """Where the files are, and what the run found, in three lines."""
    df = read_tokens(out / TABLE, COLUMNS, TEXT_COLUMNS)
    rec = json.loads((out / RUN).read_text())
    solve = rec["contexts"]["solve_rate"]
    return [f"wrote {out / TABLE} and {out / RUN}",
            f"rollouts solved: {solve:.1%} of {rec['contexts']['n_contexts']}; positions: "
            f"{df.groupby(['context_id', 'position']).ngroups} in {df['context_id'].nunique()} contexts; "
            f"branches: {len(df)}",
            f"viable: {df['viable_greedy'].mean():.1%} greedy"
            + (f", {df['viable_sampled'].mean():.1%} sampled" if df["viable_sampled"].notna().any() else "")
            + f"; next: teachdiag analyze {out}"]
