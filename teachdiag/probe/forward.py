"""Model forwards over a context that every instrument shares: the teacher's logits, padded batches.

    from teachdiag.probe.forward import teacher_logits, view_logits, pad_left
    t = teacher_logits(teacher, ctx, positions=[0, 5, 9], vocab=V, device="cpu")   # (3, V) float32
    z = view_logits(student, ctx.prompt_ids, ctx.response_ids, [0, 5, 9], V, "cpu")  # the student's view
    batch = pad_left([ids_a, ids_b])        # input_ids, attention_mask, position_ids (B, L)
    trim_heap()                             # between contexts: freed CPU memory back to the OS

The teacher runs once per context and computes its LM head only at the probed positions, so a
~150k vocabulary costs (P, V) floats per context, not (T, V).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from teachdiag.contexts import Context


def teacher_logits(teacher, ctx: Context, positions: list[int], vocab: int, device: torch.device | str,
                   dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """(P, V) teacher logits for response[positions], from ONE teacher forward of the context (the
    LM head only at those positions), moved to the student's `device`; float32, or with dtype None
    the teacher's own dtype (view_logits)."""
    return view_logits(teacher, ctx.teacher_view, ctx.response_ids, positions, vocab, device, dtype)


def view_logits(model, view: list[int], response_ids: list[int], positions: list[int], vocab: int,
                device: torch.device | str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """(P, V) logits of `model` predicting response[positions] after `view` (a prompt's ids), from
    one forward without gradient, the LM head only at those positions; moved to `device`. float32,
    or with dtype None the model's own (a bfloat16 model's logits at half the bytes, for callers
    whose float64 passes upcast them: exact, so every number is the float32 path's)."""
    m_device = model.get_input_embeddings().weight.device  # the first GPU of a spread model
    ids = torch.tensor(view + response_ids[:-1], device=m_device)
    keep = torch.tensor([len(view) + j - 1 for j in positions], device=m_device)
    with torch.no_grad():
        out = model(input_ids=ids[None], logits_to_keep=keep, use_cache=False)
    z = out.logits[0, :, :vocab]
    return (z if dtype is None else z.to(dtype)).to(device)


def pad_left(prefixes: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch of prefixes, left-padded so every last token sits at index −1.

    Returns model kwargs: input_ids, attention_mask (B, L) and position_ids counting from 0 at
    each prefix's first real token, so RoPE sees the same positions as an unpadded forward.
    """
    n = max(len(p) for p in prefixes)
    ids = prefixes[0].new_full((len(prefixes), n), pad_id)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prefixes):
        ids[b, n - len(p):] = p
        mask[b, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def _malloc_trim():
    """glibc's malloc_trim, looked up once; None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the CPU memory freed by the last context back to the OS (glibc's malloc_trim; a no-op
    elsewhere). Why: glibc raises its mmap threshold to 32 MB after the first large tensor is
    freed, so the many per-context tensors below that size come from a heap whose freed pages stay
    resident; context after context they add up (0.8 GB of a 10.7 GB shared step at Qwen2.5-0.5B
    shapes). Trimming between contexts keeps the resident heap at what is live. A few milliseconds."""
    if _TRIM is not None:
        _TRIM(0)
