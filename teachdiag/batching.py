"""How a run's positions are grouped: the exact probe context by context, --mode linear in batches
across contexts, the shared step in groups of --shared-batch contexts (the teacher's logits once
per context, probe/forward.py). run_groups drives all three for the runner.

    from teachdiag.batching import groups, exact_group, linear_group, run_groups
    for group in groups(todo, by_ctx, size=1):           # size = --batch in linear mode
        rows_per_context = exact_group(probe, teacher, ctxs, group, by_ctx, vocab, device)

by_ctx maps a context's index to its probed positions (ascending); every function returns, per
context of the group, the rows of its positions in that order.
"""

from __future__ import annotations

import torch

from teachdiag.contexts import Context
from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.linear import first_order_rows


def groups(todo: list[int], by_ctx: dict[int, list[int]], size: int) -> list[list[int]]:
    """Consecutive contexts, each group holding at least `size` positions (the last may hold fewer)."""
    groups, cur, n = [], [], 0
    for c in todo:
        cur.append(c)
        n += len(by_ctx[c])
        if n >= size:
            groups.append(cur)
            cur, n = [], 0
    return groups + ([cur] if cur else [])


def exact_group(probe, teacher, ctxs: list[Context], group: list[int], by_ctx: dict[int, list[int]],
                 vocab: int, device: torch.device) -> list[list[dict]]:
    """The exact probe: every context of the group on its own (one teacher forward each)."""
    out = []
    for c in group:
        ctx = ctxs[c]
        t_logits = teacher_logits(teacher, ctx, by_ctx[c], vocab, device)  # (P, V)
        s_ids = torch.tensor(ctx.prompt_ids + ctx.response_ids, device=device)
        out.append(probe.run_context(s_ids, len(ctx.prompt_ids), t_logits, by_ctx[c]))
    return out


def linear_group(cfg, student, lr: float, teacher, ctxs: list[Context], group: list[int],
                  by_ctx: dict[int, list[int]], vocab: int, device: torch.device,
                  keep: torch.Tensor | None = None) -> list[list[dict]]:
    """--mode linear: the group's positions, across contexts, in batches of cfg.batch (keep:
    the ids both tokenizers agree on, or None; signals.py)."""
    items = [(c, i, j) for c in group for i, j in enumerate(by_ctx[c])]
    t_all = {c: teacher_logits(teacher, ctxs[c], by_ctx[c], vocab, device) for c in group}  # (P_c, V) each
    # batches of similar prefix lengths waste less on padding (~1.5x on the demo pair)
    order = sorted(range(len(items)), key=lambda k: len(ctxs[items[k][0]].prompt_ids) + items[k][2])
    rows: list[dict | None] = [None] * len(items)
    for a in range(0, len(order), cfg.batch):
        chunk = [items[k] for k in order[a : a + cfg.batch]]
        prefixes = [torch.tensor(ctxs[c].prompt_ids + ctxs[c].response_ids[:j], device=device) for c, _, j in chunk]
        t = torch.stack([t_all[c][i] for c, i, _ in chunk])  # (B, V)
        ys = [ctxs[c].response_ids[j] for c, _, j in chunk]
        got = first_order_rows(student, cfg.params, prefixes, t, ys, cfg.loss, cfg.optimizer, lr, vocab, cfg.top_k,
                               keep, cfg.signals)
        for k, row in zip(order[a : a + cfg.batch], got):
            rows[k] = row
    out, a = [], 0
    for c in group:
        out.append(rows[a : a + len(by_ctx[c])])
        a += len(by_ctx[c])
    return out


def shared_groups(size: int, by_ctx: dict[int, list[int]], todo: list[int]) -> list[list[int]]:
    """The shared step's groups (--shared-batch contexts, or all) that still have work: each is
    stepped with every one of its contexts, done or not, so a resumed group takes the same step.
    size: --shared-batch (0: one group)."""
    order, left = list(by_ctx), set(todo)
    size = size or len(order)
    chunks = [order[a : a + size] for a in range(0, len(order), size)]
    return [g for g in chunks if left.intersection(g)]


def run_groups(cfg, instrument: str, probe, student, lr: float, teacher, ctxs: list[Context], by_ctx, todo,
               vocab: int, device, bar, keep: torch.Tensor | None):
    """Yield (group of context indices, rows of each) for the work left, in file order: the shared
    step group by group, the exact probe context by context, linear mode in --batch positions.
    cfg: the run's ProbeConfig; bar: its progress bar (progress.py), which the shared step advances itself."""
    if instrument == "shared":
        left = set(todo)
        progress = lambda n, phase: (bar.set_postfix_str(phase, refresh=False), bar.update(n))  # noqa: E731
        for group in shared_groups(cfg.shared_batch, by_ctx, todo):
            rows = probe.run(teacher, ctxs, by_ctx, group, device, progress)
            mine = [c for c in group if c in left]
            yield mine, [rows[c] for c in mine]
        return
    # exact: one context at a time; linear: consecutive contexts until a batch is full
    for group in groups(todo, by_ctx, cfg.batch if cfg.mode == "linear" else 1):
        yield group, (exact_group(probe, teacher, ctxs, group, by_ctx, vocab, device) if probe else
                      linear_group(cfg, student, lr, teacher, ctxs, group, by_ctx, vocab, device, keep))
