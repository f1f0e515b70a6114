"""An independent reference for the released TA-OPD selection rule, written row by row in plain
Python from the rule table of DESIGN "The trainer and the selectors" (the released code's rules,
as read from it), never from teachdiag.scores or teachdiag.selectors.

    rows = [{"sample": b, "pos": j, "valid": 1, "H": ..., "D": ..., "C": ...}, ...]
    keep = ref_keep(rows, "teachability", 0.05)          # list of 0/1, one per row
    ref_topk_signals(student_items, teacher_items)       # H, D, C from (id, logp) lists
"""

import math
import random

import numpy as np


def ref_quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] if lo == hi else xs[lo] * (1 - (pos - lo)) + xs[hi] * (pos - lo)


def ref_norm(values):
    """Over every row given: clip((v − q05)/(q95 − q05), 0, 1); a flat span (< 1e-12): all 0;
    a non-finite value: 0."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = ref_quantile(finite, 0.05), ref_quantile(finite, 0.95)
    if abs(hi - lo) < 1e-12:
        return [0.0] * len(values)
    return [min(1.0, max(0.0, (v - lo) / (hi - lo))) if math.isfinite(v) else 0.0 for v in values]


def ref_scores(rows):
    """Adds Hn, Dn, Cn, teachability, tip, ca_softor to each row (normalised over all rows)."""
    hn, dn, cn = (ref_norm([r[k] for r in rows]) for k in ("H", "D", "C"))
    dcn = ref_norm([r["D"] * r["C"] for r in rows])
    for r, h, d, c, dc in zip(rows, hn, dn, cn, dcn):
        r.update(entropy=h, divergence=d, teachability=d * c, tip=h + d - h * d, ca_softor=h + dc - h * dc)


def ref_top(rows, candidates, key, n):
    """Sort by (score, −position) descending, stable: the earliest position, then the earliest row."""
    ordered = sorted(candidates, key=lambda i: (rows[i][key], -rows[i]["pos"]), reverse=True)
    return ordered[:n]


def ref_keep(rows, selector, budget, seed=0, min_keep=1):
    """0/1 per row: max(1, ceil(N_valid·ρ)) valid rows by the selector's score over the batch
    (random: a random.Random(seed) shuffle), then each sample with fewer than min_keep kept gets
    its best valid rows by ca_softor, beyond the budget."""
    rows = [dict(r) for r in rows]
    ref_scores(rows)
    valid = [i for i, r in enumerate(rows) if r["valid"]]
    if not valid:
        return [0] * len(rows)
    count = max(1, math.ceil(len(valid) * budget))
    if selector == "random":
        shuffled = valid[:]
        random.Random(seed).shuffle(shuffled)
        selected = set(shuffled[:count])
    else:
        selected = set(ref_top(rows, valid, selector, count))
    for b in sorted({rows[i]["sample"] for i in valid}):
        mine = [i for i in valid if rows[i]["sample"] == b]
        short = min_keep - sum(i in selected for i in mine)
        if short > 0:
            selected.update(ref_top(rows, [i for i in mine if i not in selected], "ca_softor", short))
    return [int(i in selected and rows[i]["valid"]) for i in range(len(rows))]


def ref_topk_signals(student_items, teacher_items, teacher_at_student=None):
    """H, D, C from a served pair of top-K lists [(id, logp), ...] (descending). H: the student's
    probabilities renormalised, entropy / log(max(n, 2)); D: forward KL over the union of ids, each
    side renormalised by its returned mass, a missing id at probability 1e-12; C: the teacher's
    probability summed over the student's ids (from its own list, or exact from teacher_at_student,
    {id: logp}), clamped to [0, 1]."""
    s = {i: math.exp(lp) for i, lp in student_items if math.isfinite(lp)}
    t = {i: math.exp(lp) for i, lp in teacher_items if math.isfinite(lp)}
    ps = [p for p in s.values() if p > 0]
    mass = sum(ps)
    h = 0.0
    if mass > 0:
        q = [p / mass for p in ps]
        h = -sum(x * math.log(max(x, 1e-12)) for x in q) / math.log(max(len(q), 2))
    union = set(s) | set(t)
    sm, tm = sum(s.get(i, 0.0) for i in union), sum(t.get(i, 0.0) for i in union)
    d = 0.0
    if union and sm > 0 and tm > 0:
        for i in union:
            a, b = max(s.get(i, 0.0) / sm, 1e-12), max(t.get(i, 0.0) / tm, 1e-12)
            d += b * (math.log(b) - math.log(a))
    src = t if teacher_at_student is None else {i: math.exp(lp) for i, lp in teacher_at_student.items()}
    c = min(1.0, max(0.0, sum(src.get(i, 0.0) for i in s)))
    return {"topk_entropy": h, "union_fkl": d, "compat_mass": c}


def ref_served_row(s_logits, t_logits, k):
    """ref_topk_signals of one position from its full logits: each side's top-K (id, logp) list
    from a float64 log-softmax, C exact (the teacher's log-probabilities at the student's ids)."""
    from reference import _logsoftmax

    ls, lt = _logsoftmax(s_logits), _logsoftmax(t_logits)
    top_s, top_t = np.argsort(-ls, kind="stable")[:k], np.argsort(-lt, kind="stable")[:k]
    si = [(int(i), float(ls[i])) for i in top_s]
    return ref_topk_signals(si, [(int(i), float(lt[i])) for i in top_t], {i: float(lt[i]) for i, _ in si})
