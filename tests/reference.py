"""Independent references the tests compare against: float64 NumPy signals and a naive probe.

The naive probe does what the definition says and nothing clever: deep-copy the student,
forward the FULL sequence, take the loss through torch.distributions, step with torch.optim
(or by hand for the normalized rule), forward the full sequence again with the copy.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch.distributions import Categorical, kl_divergence


def _logsoftmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def ref_signals(s_logits, t_logits, y: int, k: int, keep=None) -> dict[str, float]:
    """keep: None or a bool (V,) array; then both distributions are cut to the kept ids and
    renormalised there (p[keep] / p[keep].sum()), and y outside keep has NaN logprobs."""
    ls_full, lt_full = _logsoftmax(s_logits), _logsoftmax(t_logits)
    if keep is None:
        keep = np.ones(len(ls_full), dtype=bool)
    keep = np.asarray(keep, dtype=bool)
    dropped = {"student_dropped_mass": float(np.exp(ls_full)[~keep].sum()),
               "teacher_dropped_mass": float(np.exp(lt_full)[~keep].sum())}
    ls, lt = _logsoftmax(ls_full[keep]), _logsoftmax(lt_full[keep])  # log(p[keep] / p[keep].sum())
    ps, pt = np.exp(ls), np.exp(lt)
    y = int(np.flatnonzero(keep).searchsorted(y)) if keep[y] else None  # y's index among the kept ids
    top_s = np.argsort(-ls, kind="stable")[:k]
    top_t = np.argsort(-lt, kind="stable")[:k]
    q = ps[top_s] / ps[top_s].sum()
    u = np.union1d(top_s, top_t)
    pu_t, pu_s = pt[u] / pt[u].sum(), ps[u] / ps[u].sum()
    return {
        "fkl": float(np.sum(pt * (lt - ls))),
        "rkl": float(np.sum(ps * (ls - lt))),
        "student_entropy": float(-np.sum(ps * ls)),
        "teacher_entropy": float(-np.sum(pt * lt)),
        "student_logprob": float(ls[y]) if y is not None else math.nan,
        "teacher_logprob": float(lt[y]) if y is not None else math.nan,
        "compat_mass": float(pt[top_s].sum()),
        "topk_entropy": float(-np.sum(q * np.log(q)) / math.log(k)) if k > 1 else 0.0,
        "union_fkl": float(np.sum(pu_t * np.log(pu_t / pu_s))),
        **dropped,
    }


def full_logits(model, ids: list[int], index: int, vocab: int, dtype=torch.float32) -> torch.Tensor:
    """Logits at sequence index `index` from a forward over the whole sequence."""
    out = model(input_ids=torch.tensor([ids]))
    return out.logits[0, index, :vocab].to(dtype)


def reference_params(model, params: str) -> list:
    """The stepped parameters, spelled out for Qwen/Llama (model.model.layers, .norm, .lm_head)."""
    if params == "all":
        return list(model.parameters())
    if params == "lm_head":
        return [model.lm_head.weight]
    n = int(params.split(":")[1])  # last:N
    chosen = [p for layer in model.model.layers[-n:] for p in layer.parameters()]
    chosen += list(model.model.norm.parameters()) + [model.lm_head.weight]
    return list({id(p): p for p in chosen}.values())


def reference_loss(s: torch.Tensor, t: torch.Tensor, y: int, loss: str) -> torch.Tensor:
    """The probe loss from float64 logits (V,) through torch.distributions."""
    ps, pt = Categorical(logits=s), Categorical(logits=t)
    if loss == "reverse_kl":
        return kl_divergence(ps, pt)
    if loss == "forward_kl":
        return kl_divergence(pt, ps)
    lp_s = ps.log_prob(torch.tensor(y))
    return -(pt.log_prob(torch.tensor(y)) - lp_s).detach() * lp_s


def naive_probe(student, teacher, ctx: dict, j: int, vocab: int, loss: str, optimizer: str, lr: float,
                params: str = "all", dtype=torch.float32) -> dict[str, float]:
    """Gains at position j of ctx by deep copy + torch.optim, for comparison with the tool.

    dtype=torch.float64 runs the copies of both models (and the step) in float64: a reference with
    no float32 rounding at all, for comparing float32 runs on other devices."""
    model = copy.deepcopy(student).to(dtype)
    if dtype != torch.float32:
        teacher = copy.deepcopy(teacher).to(dtype)
    model.requires_grad_(False)
    chosen = reference_params(model, params)
    for p in chosen:
        p.requires_grad_(True)
    s_ids = ctx["prompt_ids"] + ctx["response_ids"]
    t_view = ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]
    t_ids = t_view + ctx["response_ids"]
    y = ctx["response_ids"][j]
    with torch.no_grad():
        t = full_logits(teacher, t_ids, len(t_view) + j - 1, vocab, dtype).double()
    s = full_logits(model, s_ids, len(ctx["prompt_ids"]) + j - 1, vocab, dtype).double()
    reference_loss(s, t, y, loss).backward()
    grads = [p.grad.clone() for p in chosen]
    grad_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    g_adam = reference_first_order([g.double() for g in grads], "adam")
    if optimizer == "sgd":
        torch.optim.SGD(chosen, lr=lr).step()
    elif optimizer == "adam":
        torch.optim.Adam(chosen, lr=lr, betas=(0.9, 0.999), eps=1e-8).step()
    else:
        with torch.no_grad():
            for p, g in zip(chosen, grads):
                p -= lr * g / grad_norm
    with torch.no_grad():
        after = full_logits(model, s_ids, len(ctx["prompt_ids"]) + j - 1, vocab, dtype)
    b = ref_signals(s.detach().numpy(), t.numpy(), y, 16)
    a = ref_signals(after.numpy(), t.numpy(), y, 16)
    return {"fkl": b["fkl"], "rkl": b["rkl"], "fkl_after": a["fkl"], "rkl_after": a["rkl"],
            "gain_fkl": b["fkl"] - a["fkl"], "gain_rkl": b["rkl"] - a["rkl"], "grad_norm": grad_norm,
            "g_l1": sum(float(g.abs().double().sum()) for g in grads), "g_adam": g_adam,
            "student_logprob": b["student_logprob"], "student_logprob_after": a["student_logprob"],
            "teacher_logprob": b["teacher_logprob"]}


def reference_gradient(student, teacher, ctx: dict, j: int, vocab: int, loss: str,
                       params: str = "all") -> list[torch.Tensor]:
    """∂ℓ_j/∂θ at θ0 in float64: deep copies of both models cast to float64, full-sequence
    forwards, the loss through torch.distributions, plain autograd."""
    model, t_model = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    model.requires_grad_(False)
    chosen = reference_params(model, params)
    for p in chosen:
        p.requires_grad_(True)
    t_view = ctx.get("teacher_prompt_ids") or ctx["prompt_ids"]
    s_ids = ctx["prompt_ids"] + ctx["response_ids"]
    with torch.no_grad():
        t = t_model(input_ids=torch.tensor([t_view + ctx["response_ids"]])).logits[0, len(t_view) + j - 1, :vocab]
    s = model(input_ids=torch.tensor([s_ids])).logits[0, len(ctx["prompt_ids"]) + j - 1, :vocab]
    return list(torch.autograd.grad(reference_loss(s, t, ctx["response_ids"][j], loss), chosen))


def reference_first_order(grads: list[torch.Tensor], optimizer: str) -> float:
    """⟨g, scale·d⟩ per unit lr, written out from DESIGN "One step rule" for each step rule:
    sgd ‖g‖², normalized ‖g‖, adam (first bias-corrected step, d = g/(|g|+1e-8)) Σ g²/(|g|+1e-8)."""
    sq = sum(float((g.double() ** 2).sum()) for g in grads)
    if optimizer == "sgd":
        return sq
    if optimizer == "normalized":
        return math.sqrt(sq)
    if optimizer == "adam":
        return sum(float((g.double() ** 2 / (g.double().abs() + 1e-8)).sum()) for g in grads)
    raise ValueError(optimizer)
