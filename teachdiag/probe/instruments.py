"""The instruments for the gain behind one interface: how positions are grouped, and their rows.

    from teachdiag.probe.instruments import INSTRUMENTS, make_instrument
    inst = make_instrument("per_position", student=S, params="all", loss="reverse_kl",
                           optimizer="normalized", lr=1e-3, vocab=V)
    for group in inst.groups(by_ctx, todo):
        rows = inst.run(teacher, ctxs, by_ctx, group, device, progress)   # {context: [row, ...]}

Every instrument has the same four members, so the probe command never asks which one it holds:
  name                     the tokens.csv `instrument` column (per_position, shared, checkpoint)
  groups(by_ctx, todo)     the contexts computed together, in file order (a shared step's group also
                           holds contexts already done: they take part in its step)
  work(by_ctx, groups)     progress-bar units for those groups
  run(...)                 {context: rows of its positions, ascending}, advancing progress(n, phase)
  record()                 what run.json says about how θ1 was reached
by_ctx maps a context's index to its probed positions (ascending). A new instrument is one class
here and one entry in INSTRUMENTS.
"""

from __future__ import annotations

from typing import Callable

import torch

from teachdiag.contexts import Context
from teachdiag.probe.checkpoint import CheckpointScore
from teachdiag.probe.fast import make_probe
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.linear import first_order_rows
from teachdiag.probe.shared import SharedStep

Progress = Callable[[int, str], None]


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
    """One step on the mean loss of a group of contexts (shared.py), every position re-scored."""

    name = "shared"

    def __init__(self, step: SharedStep, group_size: int, first_order: bool) -> None:
        self.step, self.size, self.first_order = step, group_size, first_order

    def groups(self, by_ctx: dict[int, list[int]], todo: list[int]) -> list[list[int]]:
        """The groups (--shared-batch contexts, or all) that still have work: each is stepped with
        every one of its contexts, done or not, so a resumed group takes the same step."""
        order, left = list(by_ctx), set(todo)
        size = self.size or len(order)
        chunks = [order[a : a + size] for a in range(0, len(order), size)]
        return [g for g in chunks if left.intersection(g)]

    def work(self, by_ctx: dict[int, list[int]], groups: list[list[int]]) -> int:
        return 2 * positions_in(by_ctx, groups)  # two passes over every context of a group

    def run(self, teacher, ctxs: list[Context], by_ctx: dict[int, list[int]], group: list[int], device,
            progress: Progress) -> dict[int, list[dict]]:
        return self.step.run(teacher, ctxs, by_ctx, group, device, progress)

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
            first_order=True, cache_dir=None, **_):
    step = SharedStep(student, params, loss, optimizer, lr, vocab, top_k, first_order=first_order,
                      cache_dir=cache_dir, keep=keep, signals=signals)
    return Shared(step, shared_batch, first_order)


def _checkpoint(student, vocab, after, top_k=16, keep=None, signals="full", after_record=None, **_):
    return Checkpoint(CheckpointScore(student, after, vocab, top_k, keep=keep, signals=signals), vocab,
                      {"after": after_record, "theta1": "the --student-after checkpoint; no step taken"})


# kind -> constructor taking keyword arguments (those a kind does not use are ignored)
INSTRUMENTS = {"per_position": _per_position, "linear": _linear, "shared": _shared, "checkpoint": _checkpoint}


def make_instrument(kind: str, **kwargs):
    """The instrument of `kind` (INSTRUMENTS), built from keyword arguments: student, params, loss,
    optimizer, lr, vocab, top_k, keep, signals, and per kind batch (linear), shared_batch /
    first_order / cache_dir (shared), after / after_record (checkpoint)."""
    if kind not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {kind!r}; one of {tuple(INSTRUMENTS)}")
    return INSTRUMENTS[kind](**kwargs)
