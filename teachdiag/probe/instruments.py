"""The instruments for the gain behind one interface: how positions are grouped, and their rows.

    from teachdiag.probe.instruments import INSTRUMENTS, make_instrument
    inst = make_instrument("per_position", student=S, params="all", loss="reverse_kl",
                           optimizer="normalized", lr=1e-3, vocab=V)
    for group in inst.groups(by_ctx, todo):
        rows = inst.run(teacher, ctxs, by_ctx, group, device, progress)   # {context: [row, ...]}

Every instrument has the same four members, so the probe command never asks which one it holds:
  name                     the tokens.csv `instrument` column (per_position, shared, checkpoint)
  groups(by_ctx, todo)     the contexts whose rows are computed together, in file order, all of todo
                           (a shared step is still taken over done contexts too: they are in its loss)
  work(by_ctx, groups)     progress-bar units for those groups
  run(...)                 {context: rows of its positions, ascending}, advancing progress(n, phase)
  record()                 what run.json says about how θ1 was reached
by_ctx maps a context's index to its probed positions (ascending). A new instrument is one class
here and one entry in INSTRUMENTS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from teachdiag.contexts import Context
from teachdiag.probe.checkpoint import CheckpointScore
from teachdiag.probe.fast import make_probe
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.linear import first_order_rows
from teachdiag.probe.shared import SharedStep
from teachdiag.probe.stepfile import check_free_space

Progress = Callable[[int, str], None]
# a shared step's rows come out in groups of at least this many positions: a crash loses at most one
# group's re-scoring, and a step whose rows fit in one group is never saved (2,048 positions ≈ 10
# contexts of 192: seconds on a GPU, minutes at 0.5B on a CPU)
ROW_GROUP = 2048


def consecutive(todo: list[int], by_ctx: dict[int, list[int]], size: int) -> list[list[int]]:
    """Consecutive contexts, each group holding at least `size` positions (the last may hold fewer)."""
    groups, cur, n = [], [], 0
    for c in todo:
        cur.append(c)
        n += len(by_ctx[c])
        if n >= size:
            groups.append(cur)
            cur, n = [], 0
    return groups + ([cur] if cur else [])


def positions_in(by_ctx: dict[int, list[int]], groups: list[list[int]]) -> int:
    return sum(len(by_ctx[c]) for g in groups for c in g)


class PerPosition:
    """One step on each position's own loss (exact.py / fast.py), one context at a time; also the
    checkpoint scorer, which has the same per-context call (`scorer`: any object with run_context)."""

    name = "per_position"

    def __init__(self, scorer, vocab: int, record: dict) -> None:
        self.scorer, self.vocab, self._record = scorer, vocab, record

    def groups(self, by_ctx: dict[int, list[int]], todo: list[int]) -> list[list[int]]:
        return [[c] for c in todo]

    def work(self, by_ctx: dict[int, list[int]], groups: list[list[int]]) -> int:
        return positions_in(by_ctx, groups)

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int], device,
            progress: Progress) -> dict[int, list[dict]]:
        out = {}
        for c in group:
            ctx = ctxs[c]
            t = teacher_logits(teacher, ctx, by_ctx[c], self.vocab, device)  # (P, V)
            s_ids = torch.tensor(ctx.prompt_ids + ctx.response_ids, device=device)
            out[c] = self.scorer.run_context(s_ids, len(ctx.prompt_ids), t, by_ctx[c])
            progress(len(out[c]), "")
        return out

    def record(self) -> dict:
        return {"probe": type(self.scorer).__name__, **self._record}


class Checkpoint(PerPosition):
    name = "checkpoint"


class Linear:
    """--mode linear: no step, gain_first_order = lr·⟨g, d⟩, positions batched across contexts."""

    name = "per_position"

    def __init__(self, student, params: str, loss: str, optimizer: str, lr: float, vocab: int, top_k: int,
                 keep: torch.Tensor | None, signals: str, batch: int) -> None:
        self.student, self.params, self.loss, self.optimizer, self.lr = student, params, loss, optimizer, lr
        self.vocab, self.top_k, self.keep, self.signals, self.batch = vocab, top_k, keep, signals, batch

    def groups(self, by_ctx: dict[int, list[int]], todo: list[int]) -> list[list[int]]:
        return consecutive(todo, by_ctx, self.batch)

    def work(self, by_ctx: dict[int, list[int]], groups: list[list[int]]) -> int:
        return positions_in(by_ctx, groups)

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int], device,
            progress: Progress) -> dict[int, list[dict]]:
        items = [(c, i, j) for c in group for i, j in enumerate(by_ctx[c])]
        t_all = {c: teacher_logits(teacher, ctxs[c], by_ctx[c], self.vocab, device) for c in group}  # (P_c, V)
        # batches of similar prefix lengths waste less on padding (~1.5x on the demo pair)
        order = sorted(range(len(items)), key=lambda k: len(ctxs[items[k][0]].prompt_ids) + items[k][2])
        rows: list[dict | None] = [None] * len(items)
        for a in range(0, len(order), self.batch):
            chunk = [items[k] for k in order[a : a + self.batch]]
            prefixes = [torch.tensor(ctxs[c].prompt_ids + ctxs[c].response_ids[:j], device=device)
                        for c, _, j in chunk]
            t = torch.stack([t_all[c][i] for c, i, _ in chunk])  # (B, V)
            ys = [ctxs[c].response_ids[j] for c, _, j in chunk]
            got = first_order_rows(self.student, self.params, prefixes, t, ys, self.loss, self.optimizer, self.lr,
                                   self.vocab, self.top_k, self.keep, self.signals)
            for k, row in zip(order[a : a + self.batch], got):
                rows[k] = row
            progress(len(chunk), "")
        out, a = {}, 0
        for c in group:
            out[c] = rows[a : a + len(by_ctx[c])]
            a += len(by_ctx[c])
        return out

    def record(self) -> dict:
        return {"probe": "first_order_rows",
                "theta1": "none: gain_first_order = lr·<grad l_j, d_j> at θ0 (--mode linear)"}


class Shared:
    """One step on the mean loss of a group of contexts (shared.py), every position re-scored.

    A step's rows come out in row groups of >= ROW_GROUP positions, each written by the runner as
    it finishes. When a step has more than one row group left, its ∇L and θ0 signals are saved in
    the run folder after pass 1 (shared_step.<k>.safetensors, 4 bytes per stepped parameter, free
    space checked before any work), so --resume rebuilds θ1 from it and re-scores only the
    contexts not yet written; the file goes once the step's last rows are out. A step with a single
    row group (a small --shared-batch) is simply taken again by a resume, as one context is."""

    name = "shared"

    def __init__(self, step: SharedStep, group_size: int, first_order: bool, folder: str | None = None,
                 resume: bool = False) -> None:
        """folder: the run folder (None: never save the step); resume: a saved step may be used."""
        self.step, self.size, self.first_order = step, group_size, first_order
        self.folder, self.resume = (Path(folder) if folder else None), resume
        self.plan: dict[tuple[int, ...], dict] = {}  # row group -> its step (see groups)
        self.held: int | None = None  # the step SharedStep holds now

    def _file(self, k: int) -> Path:
        return self.folder / f"shared_step.{k}.safetensors"

    def groups(self, by_ctx: dict[int, list[int]], todo: list[int]) -> list[list[int]]:
        """Row groups of the contexts left, in file order. Each is re-scored by its step, which is
        computed over every context of its --shared-batch group (or of the run), done or not, or
        loaded from a step saved by the interrupted run. Removes saved steps no longer needed and
        refuses (one line) to start when the disk cannot take the one to be saved."""
        order, left = list(by_ctx), set(todo)
        size = self.size or len(order)
        self.plan, out, need, keep = {}, [], 0, set()
        for k, a in enumerate(range(0, len(order), size)):
            contexts = order[a : a + size]
            rows = consecutive([c for c in contexts if c in left], by_ctx, ROW_GROUP)
            if not rows:
                continue
            load = bool(self.folder and self.resume and self.step.matches(self._file(k), contexts, by_ctx))
            save = bool(self.folder) and len(rows) > 1  # a step taken again (load failed) is saved again
            keep |= {self._file(k).name} if load else set()
            need = max(need, self.step.saved_bytes(contexts, by_ctx) if save and not load else 0)
            for i, g in enumerate(rows):
                self.plan[tuple(g)] = {"step": k, "contexts": contexts, "load": load, "save": save,
                                       "last": i == len(rows) - 1}
            out += rows
        if self.folder:
            for f in self.folder.glob("shared_step.*.safetensors*"):  # an earlier run's, or a finished step's
                if f.name not in keep:
                    f.unlink(missing_ok=True)
            if need:
                check_free_space(self.folder, need)
        return out

    def work(self, by_ctx: dict[int, list[int]], groups: list[list[int]]) -> int:
        """Pass 2 over the groups, pass 1 over every context of each step not loaded."""
        steps = {self.plan[tuple(g)]["step"]: self.plan[tuple(g)] for g in groups}
        first = sum(len(by_ctx[c]) for p in steps.values() if not p["load"] for c in p["contexts"])
        return first + positions_in(by_ctx, groups)

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int], device,
            progress: Progress) -> dict[int, list[dict]]:
        plan = self.plan[tuple(group)]
        k, contexts = plan["step"], plan["contexts"]
        if self.held != k:
            self.step.release()
            self.held = None
            if not (plan["load"] and self.step.load(self._file(k), contexts, by_ctx, device)):
                self.step.gradient(teacher, ctxs, by_ctx, contexts, device, progress)
                if plan["save"]:
                    self.step.save(self._file(k), contexts, by_ctx)
            self.held = k
        rows = self.step.rescore(teacher, ctxs, by_ctx, group, device, progress)
        if plan["last"]:  # every row of this step is out: the runner writes these next
            self.step.release()
            self.held = None
            if self.folder:
                self._file(k).unlink(missing_ok=True)
        return rows

    def record(self) -> dict:
        batch = f"each group of {self.size} contexts" if self.size else "all probed positions"
        return {"probe": "SharedStep", "theta1": f"one step on the mean probe loss over {batch}",
                "shared_batch": self.size,
                "first_order": "lr·<grad l_t(θ0), scale·d> by forward-mode JVP" if self.first_order else "skipped"}


def _per_position(student, params, loss, optimizer, lr, vocab, top_k=16, keep=None, signals="full", **_):
    return PerPosition(make_probe(student, params, loss, optimizer, lr, vocab, top_k, keep=keep, signals=signals),
                       vocab, {"theta1": "one step on each position's own loss (fresh θ1 per position)"})


def _linear(student, params, loss, optimizer, lr, vocab, top_k=16, keep=None, signals="full", batch=16, **_):
    return Linear(student, params, loss, optimizer, lr, vocab, top_k, keep, signals, batch)


def _shared(student, params, loss, optimizer, lr, vocab, top_k=16, keep=None, signals="full", shared_batch=0,
            first_order=True, cache_dir=None, resume=False, **_):
    step = SharedStep(student, params, loss, optimizer, lr, vocab, top_k, first_order=first_order, keep=keep,
                      signals=signals)
    return Shared(step, shared_batch, first_order, cache_dir, resume)


def _checkpoint(student, vocab, after, top_k=16, keep=None, signals="full", after_record=None, **_):
    return Checkpoint(CheckpointScore(student, after, vocab, top_k, keep=keep, signals=signals), vocab,
                      {"after": after_record, "theta1": "the --student-after checkpoint; no step taken"})


# kind -> constructor taking keyword arguments (those a kind does not use are ignored)
INSTRUMENTS = {"per_position": _per_position, "linear": _linear, "shared": _shared, "checkpoint": _checkpoint}


def make_instrument(kind: str, **kwargs):
    """The instrument of `kind` (INSTRUMENTS), built from keyword arguments: student, params, loss,
    optimizer, lr, vocab, top_k, keep, signals, and per kind batch (linear), shared_batch /
    first_order / cache_dir (the run folder, where a shared step is saved) / resume (shared),
    after / after_record (checkpoint)."""
    if kind not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {kind!r}; one of {tuple(INSTRUMENTS)}")
    return INSTRUMENTS[kind](**kwargs)
