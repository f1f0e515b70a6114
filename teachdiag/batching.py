"""How a run's positions are grouped: the exact probe context by context, --mode linear in batches
across contexts (the teacher's logits once per context, probe/forward.py).

    from teachdiag.batching import groups, exact_group, linear_group
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
                               keep)
        for k, row in zip(order[a : a + cfg.batch], got):
            rows[k] = row
    out, a = [], 0
    for c in group:
        out.append(rows[a : a + len(by_ctx[c])])
        a += len(by_ctx[c])
    return out
