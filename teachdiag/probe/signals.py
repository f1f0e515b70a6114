"""Per-position signals (DESIGN "Signals at θ0") as pure functions over logits, in nats.

    from teachdiag.probe.signals import signals_from_logits, probe_loss, clipped_fkl
    s = signals_from_logits(student_logits, teacher_logits, token_ids, k=16)   # dict of (P,)
    s["fkl"], s["compat_mass"], s["union_fkl"], ...
    clipped_fkl(student_logits, teacher_logits, clip=0.05)   # (P,) the OPSD training loss (training.py)

teachability and incompat need the whole run's quantiles, so they live in table.py.

Logits are (P, V) over one vocabulary (padded rows already dropped). All arithmetic is done
in float64: gains are differences of two KLs that agree to ~1e-4, so float32 sums over a 150k
vocabulary would leave too few correct digits.

keep: None when both tokenizers give every id the same meaning, else a bool (V,) mask of the ids
they agree on (tokenizers.TokenizerMatch.shared_ids, made by keep_mask). Then every signal and
loss is computed over the kept ids with both distributions renormalised there: the kept columns
are selected (index_select) before any softmax, so a dropped id has no probability at all and
receives an exact zero gradient. A sampled token outside keep has no log-probability in that
space: its logprobs are NaN (the row is then not finite and left out of every statistic).
student_dropped_mass / teacher_dropped_mass say how much of each full softmax was dropped.

Chunks: the float64 passes (signals, the KLs after a step, a loss's gradient) run over at most
chunk_rows(V) positions at a time, so a context's float64 peak is about CHUNK_BYTES whatever its
length: at V = 151,936 a (192, V) float64 tensor is 233 MB and the signals hold ~10 at once. Every
quantity is per row, so chunking changes no number: bitwise equal with one torch thread; with
several, torch may split a short chunk's row sums across threads (≈ 1e-16 relative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from teachdiag.probe.topk import served_signals, topk_lists

SIGNALS = ("fkl", "rkl", "student_entropy", "teacher_entropy", "student_logprob",
           "teacher_logprob", "compat_mass", "topk_entropy", "union_fkl", "student_dropped_mass",
           "teacher_dropped_mass")
LOSSES = ("reverse_kl", "forward_kl", "sampled_token")
# where H, D and C come from (DESIGN "Top-K signals"): full distributions (teachdiag's), or each
# side's top-K lists as a served teacher returns them, C exact (the teacher asked at the student's
# ids) or from the teacher's own list only (topk_lb, a lower bound)
SIGNAL_MODES = ("full", "topk", "topk_lb")
# the float64 temporaries of one chunk of positions stay under about CHUNK_BYTES: signals_from_logits
# and loss_grad's autograd hold up to LIVE (rows, V) float64 tensors at once (two log-softmaxes, two
# exps, kl's terms; a backward's gradients), measured by the peak RSS of one call: 9.1–9.5 on CPU
CHUNK_BYTES = 128 * 2**20
LIVE = 10


def chunk_rows(vocab: int) -> int:
    """Positions per chunk of the float64 passes: 11 at V = 151,936, 34 at V = 49,152."""
    return max(1, CHUNK_BYTES // (LIVE * 8 * vocab))


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    step = chunk_rows(vocab)
    return [slice(a, a + step) for a in range(0, n_rows, step)] or [slice(0, 0)]  # no rows: one empty chunk


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def keep_mask(shared_ids: list[int] | None, vocab: int, device=None) -> torch.Tensor | None:
    """bool (vocab,), True on `shared_ids` (TokenizerMatch.shared_ids); None stays None (identical)."""
    if shared_ids is None:
        return None
    keep = torch.zeros(vocab, dtype=torch.bool, device=device)
    keep[torch.as_tensor(shared_ids, dtype=torch.long, device=device)] = True
    return keep


def restrict(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(P, V) logits -> (P, V') float64 logits of the kept ids, V' = keep.sum(); softmax over them
    is the distribution renormalised on the kept ids. keep None: logits.double() itself."""
    x = logits.double()
    if keep is None:
        return x
    if keep.shape != x.shape[-1:]:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, logits have {x.shape[-1]} columns")
    return x.index_select(-1, keep.nonzero().squeeze(1))


def token_index(token_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(P,) token ids -> (P,) their columns in restrict()'s output, -1 for an id outside keep."""
    y = token_ids.long()
    if keep is None:
        return y
    column = keep.long().cumsum(0) - 1  # column of each kept id among the kept ones
    return torch.where(keep[y], column[y], -1)


def at_token(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P,) log_p[i, y[i]]; NaN where y[i] is -1 (a token outside keep). torch.where, not a product,
    so the backward gives those rows an exact zero, never NaN·0."""
    got = log_p.gather(-1, y.clamp(min=0).view(-1, 1)).squeeze(-1)
    return torch.where(y < 0, torch.full_like(got, float("nan")), got)


def dropped_mass(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(P,) float64 softmax mass of the full (P, V) logits on ids outside keep (0 where keep is None);
    summed over the dropped ids themselves, so a tiny mass keeps its relative precision."""
    if keep is None:
        return torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    return F.log_softmax(logits.double(), -1)[:, ~keep].exp().sum(-1)


def token_logprob(logits: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) float64 log p(y) from (P, V) logits, renormalised on keep (NaN for a y outside it)."""
    return at_token(F.log_softmax(restrict(logits, keep), -1), token_index(token_ids, keep))


def kl(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) along the last dim from log-probabilities; 0·log 0 counts as 0, NaN stays NaN.
    p: log_p.exp() when the caller has it already (a (P, V) float64 exp is not free)."""
    p = log_p.exp() if p is None else p
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)  # a scalar 0: no (P, V) zeros made


def entropy(log_p: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy along the last dim, nats."""
    p = log_p.exp() if p is None else p
    return -torch.where(p == 0, 0.0, p * log_p).sum(-1)


def signals_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        token_ids: torch.Tensor, k: int = 16,
                        keep: torch.Tensor | None = None, mode: str = "full") -> dict[str, torch.Tensor]:
    """Every signal of DESIGN "Signals at θ0" that needs no run-level normalisation.

    student_logits, teacher_logits: (P, V); token_ids: (P,) the sampled tokens y_j; keep: None or
    bool (V,), the ids both tokenizers agree on (module docstring); mode: SIGNAL_MODES, where
    topk_entropy, union_fkl and compat_mass come from (the rest are always full-vocabulary).
    Returns float64 tensors of shape (P,) on the logits' device, computed chunk_rows(V) rows at a time.
    """
    if mode not in SIGNAL_MODES:
        raise ValueError(f"unknown signals mode {mode!r}; one of {SIGNAL_MODES}")
    return _cat([_signals(student_logits[r], teacher_logits[r], token_ids[r], k, keep, mode)
                 for r in _chunks(len(student_logits), student_logits.shape[-1])])


def _signals(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_ids: torch.Tensor, k: int,
             keep: torch.Tensor | None, mode: str) -> dict[str, torch.Tensor]:
    """signals_from_logits on one chunk of rows (C, V)."""
    log_s = F.log_softmax(restrict(student_logits, keep), -1)  # (P, V'), V' = V when keep is None
    log_t = F.log_softmax(restrict(teacher_logits, keep), -1)  # (P, V')
    y = token_index(token_ids, keep)  # (P,), -1 outside keep
    k = min(k, log_s.shape[-1])
    top_s = log_s.topk(k, dim=-1).indices  # (P, K) the student's candidates
    top_t = log_t.topk(k, dim=-1).indices  # (P, K)

    # H: entropy of p_S renormalised over its own top-K, scaled to [0, 1] by log K
    log_sk = F.log_softmax(log_s.gather(-1, top_s), -1)
    topk_entropy = entropy(log_sk) / math.log(k) if k > 1 else torch.zeros_like(log_sk[:, 0])

    # D: forward KL with both distributions renormalised over U = topK(p_S) ∪ topK(p_T), computed on
    # the ≤ 2K columns of U (not with full-vocabulary masks: five fewer (P, V) float64 passes); a
    # teacher candidate that is also the student's is counted once
    cols = torch.cat([top_s, top_t], -1)  # (P, 2K)
    twice = torch.cat([torch.zeros_like(top_s, dtype=torch.bool),
                       (top_t[:, :, None] == top_s[:, None, :]).any(-1)], -1)  # (P, 2K)
    log_su = F.log_softmax(log_s.gather(-1, cols).masked_fill(twice, float("-inf")), -1)
    log_tu = F.log_softmax(log_t.gather(-1, cols).masked_fill(twice, float("-inf")), -1)
    union_fkl = kl(log_tu, log_su)  # a repeated column has p = 0, which kl counts as 0

    p_s, p_t = log_s.exp(), log_t.exp()
    out = {
        "fkl": kl(log_t, log_s, p_t),
        "rkl": kl(log_s, log_t, p_s),
        "student_entropy": entropy(log_s, p_s),
        "teacher_entropy": entropy(log_t, p_t),
        "student_logprob": at_token(log_s, y),
        "teacher_logprob": at_token(log_t, y),
        "compat_mass": p_t.gather(-1, top_s).sum(-1),  # C: teacher mass on student top-K
        "topk_entropy": topk_entropy,
        "union_fkl": union_fkl,
        "student_dropped_mass": dropped_mass(student_logits, keep),
        "teacher_dropped_mass": dropped_mass(teacher_logits, keep),
    }
    if mode != "full":  # H, D, C as a served teacher's top-K lists give them
        s_ids, s_lp, t_ids, t_lp, t_at_s = topk_lists(log_s, log_t, k)
        out |= served_signals(s_ids, s_lp, t_ids, t_lp, t_at_s if mode == "topk" else None)
    return out


def kls_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Only fkl and rkl, (P,) float64, by the same arithmetic as signals_from_logits: what a
    re-scored student needs after a step (the rest of the signals come from θ0). Chunked as it is."""
    parts = []
    for r in _chunks(len(student_logits), student_logits.shape[-1]):
        log_s = F.log_softmax(restrict(student_logits[r], keep), -1)  # (C, V')
        log_t = F.log_softmax(restrict(teacher_logits[r], keep), -1)
        parts.append({"fkl": kl(log_t, log_s), "rkl": kl(log_s, log_t)})
    return _cat(parts)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P,) float64 Σ_v a[i, v]·b[i, v] of two (P, V) tensors, summed in float64 a chunk at a time."""
    return torch.cat([(a[r].double() * b[r].double()).sum(-1) for r in _chunks(len(a), a.shape[-1])])


def probe_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               token_ids: torch.Tensor, loss: str, reduce: bool = True,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """The probe's loss at each position (DESIGN "One step rule"), summed over positions; teacher fixed.

    student_logits: (P, V) with grad; teacher_logits: (P, V); token_ids: (P,); keep: None or
    bool (V,) (module docstring): the loss lives on the kept ids, renormalised, and a dropped id's
    logit gets a zero gradient. sampled_token at a y outside keep is NaN: callers that sum over
    positions must leave such rows out first (probe/shared.py).
    reduce=False gives the (P,) per-position losses instead of their sum. Not chunked: its autograd
    graph keeps every row's float64 tensors until the backward; loss_grad is the bounded way to
    the gradient with respect to the logits.
    """
    log_s = F.log_softmax(restrict(student_logits, keep), -1)
    log_t = F.log_softmax(restrict(teacher_logits.detach(), keep), -1)
    if loss == "reverse_kl":
        per = kl(log_s, log_t)
    elif loss == "forward_kl":
        per = kl(log_t, log_s)
    elif loss == "sampled_token":
        y = token_index(token_ids, keep)
        lp_s, lp_t = at_token(log_s, y), at_token(log_t, y)
        per = -(lp_t - lp_s).detach() * lp_s
    else:
        raise ValueError(f"unknown loss {loss!r}; one of {LOSSES}")
    return per.sum() if reduce else per


def loss_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_ids: torch.Tensor,
              loss: str, keep: torch.Tensor | None = None, divisor: int = 1,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """(P, V) ∂(probe_loss / divisor)/∂z, in the logits' dtype: the gradient probe_loss's backward
    would leave on z, bit for bit, computed chunk_rows(V) rows at a time (each row's loss depends on
    its own row only), so no float64 graph of every position exists at once. The caller passes it on
    with z.backward(grad). Rows whose loss is not finite must be left out first, as for probe_loss.
    out: a (P, V) tensor to write it into (e.g. a view of a wider gradient buffer), returned."""
    out = torch.empty_like(student_logits) if out is None else out
    for r in _chunks(len(student_logits), student_logits.shape[-1]):
        z = student_logits[r].detach().requires_grad_(True)  # (C, V) a leaf: the graph ends here
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(probe_loss(z, teacher_logits[r], token_ids[r], loss, keep=keep) / divisor, z)
        out[r] = grad
    return out


def clipped_fkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, clip: float = 0.05,
                temperature: float = 1.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) float64 forward KL with each vocabulary entry capped: Σ_v min(p_T(v)·(log p_T(v) −
    log p_S(v)), clip), both distributions softmax(logits / temperature); teacher fixed.

    The loss of OPSD and PW-OPSD (arXiv 2605.21606; their code clamps the per-entry KL at 0.05):
    an id where the student is far below a confident teacher would otherwise dominate the
    position's gradient. Only entries above clip are capped (they get no gradient); negative
    entries, where p_S > p_T, pass unchanged. clip = inf is kl(log_t, log_s) itself. A training
    loss, not one of the probe's LOSSES (whose step rules and closed forms assume those three).
    student_logits: (P, V) with grad; teacher_logits: (P, V); keep as probe_loss.
    """
    log_s = F.log_softmax(restrict(student_logits, keep) / temperature, -1)  # (P, V')
    log_t = F.log_softmax(restrict(teacher_logits.detach(), keep) / temperature, -1)
    p_t = log_t.exp()
    terms = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_t - log_s))  # (P, V'), 0·log 0 = 0 as in kl
    return terms.clamp(max=clip).sum(-1)
