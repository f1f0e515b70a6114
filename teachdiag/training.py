"""One OPD training step and the trainer's crash-safe checkpoint: the library under `teachdiag train`.

    from teachdiag.training import train_step, save_checkpoint, recover_checkpoint, load_optimizer
    row = train_step(student, teacher, ctxs, batch=[0, 1], vocab=V, loss="sampled_token", select="teachability",
                     budget=0.05, top_k=16, optimizer=opt, device="cpu")   # {"loss", "kept", "positions", "mean_fkl"}
    save_checkpoint(out, student, tok, opt, record)    # model/ with train_state/, published by one folder swap
    record = recover_checkpoint(out)                   # the newest complete set's record, or None

A step scores every response position of the batch with teacher and student, keeps the positions
the selector picks over the whole batch (scores.keep_positions) and takes one optimizer step on the
OPD loss of the kept positions, normalised by their number (DESIGN "The trainer and the selectors").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from teachdiag.probe.forward import teacher_logits
from teachdiag.probe.signals import clipped_fkl, probe_loss, signals_from_logits
from teachdiag.runfolder import _atomic_write, discard_tree, fsync_tree, publish_folder
from teachdiag.scores import keep_positions, position_weight

TRAIN_LOSSES = ("sampled_token", "reverse_kl", "clipped_fkl")
MODEL, STATE = "model", "train_state"  # <out>/model/train_state/: the optimizer and step of those weights


def batches(n_contexts: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Context indices of each step: a seeded permutation, cycled (and re-drawn each epoch)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += rng.permutation(n_contexts).tolist()
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_ids: torch.Tensor, loss: str,
             keep: torch.Tensor | None = None, kl_clip: float = 0.05, temperature: float = 1.0) -> torch.Tensor:
    """(P,) float64 per-position training loss: clipped_fkl, or one of the probe's losses (probe_loss)."""
    if loss == "clipped_fkl":
        return clipped_fkl(student_logits, teacher_logits, kl_clip, temperature, keep=keep)
    return probe_loss(student_logits, teacher_logits, token_ids, loss, reduce=False, keep=keep)


def train_step(student, teacher, ctxs, batch: list[int], vocab: int, *, loss: str, select: str, budget: float,
               top_k: int, optimizer: torch.optim.Optimizer, device, seed: int = 0, select_rule: str = "released",
               select_signals: str = "topk",
               keep: torch.Tensor | None = None, kl_clip: float = 0.05, loss_temperature: float = 1.0,
               pw: tuple[float, float, float] | None = None) -> dict:
    """One OPD step on `batch` (context indices); returns the log row (without step and seconds).

    keep: None, or bool (vocab,): the ids both tokenizers agree on (signals.py); the scores and the
    loss live there, and sampled_token cannot train on a sampled token outside them.
    pw: None (loss = Σ kept ℓ_t / number kept), or (w_min, tau, scale) of PW-OPSD's position weight:
    loss = (1/B') Σ_b Σ_t w_t ℓ_t m_t / L_b, L_b the response length of sequence b, m_t its kept
    mask, B' the sequences with a kept position (the paper's per-sequence mean, then batch mean)."""
    views = []  # per context: ids (T,), at (R,) the indices predicting y, y (R,), teacher logits (R, V)
    for c in batch:
        ctx = ctxs[c]
        positions = list(range(len(ctx.response_ids)))
        n = len(ctx.prompt_ids)
        ids = torch.tensor(ctx.prompt_ids + ctx.response_ids[:-1], device=device)
        at = torch.arange(n - 1, n - 1 + len(positions), device=device)
        y = torch.tensor(ctx.response_ids, device=device)
        views.append((ids, at, y, teacher_logits(teacher, ctx, positions, vocab, device)))

    def logits(ids, at):
        return student(input_ids=ids[None], logits_to_keep=at, use_cache=False).logits[0, :, :vocab].float()

    # the selector's scores at θ (no gradient), over the whole batch
    sig = {k: [] for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
    with torch.no_grad():
        for ids, at, y, t in views:
            s = signals_from_logits(logits(ids, at), t, y, top_k, keep=keep, mode=select_signals)
            for k in sig:
                sig[k].append(s[k].cpu().numpy())
    sample = np.concatenate([np.full(len(v[2]), i) for i, v in enumerate(views)])
    flat = {k: np.concatenate(v) for k, v in sig.items()}
    flat["position"] = np.concatenate([np.arange(len(v[2])) for v in views])  # (N,) j within its response
    flat["response_length"] = np.concatenate([np.full(len(v[2]), len(v[2])) for v in views])
    flat["sample"] = sample
    # sampled_token cannot train where the sampled token is outside the shared ids (its loss is NaN)
    valid = (torch.cat([keep[v[2]] for v in views]).cpu().numpy() if loss == "sampled_token" and keep is not None
             else np.ones(len(sample), bool))
    if select_rule == "paper_text":  # as teachdiag 0.2: select over every row, then drop the untrainable
        kept = keep_positions(flat, select, budget, rule=select_rule, seed=seed) & valid
    else:  # the released rule counts, ranks and fills among the trainable rows (its loss mask)
        kept = keep_positions(flat, select, budget, valid, rule=select_rule, seed=seed)
    n_kept = int(kept.sum())
    n_seqs = sum(bool(m.any()) for m in np.split(kept, np.cumsum([len(v[2]) for v in views])[:-1]))  # B'

    optimizer.zero_grad(set_to_none=True)
    total, a = 0.0, 0
    for ids, at, y, t in views:
        kept_here = kept[a : a + len(y)]
        mask = torch.from_numpy(kept_here).to(device)
        a += len(y)
        if not mask.any():
            continue
        with torch.enable_grad():
            per = opd_loss(logits(ids, at)[mask], t[mask], y[mask], loss, keep, kl_clip, loss_temperature)  # (kept,)
            if pw is None:
                part = per.sum() / n_kept  # normalised by the kept positions of the whole batch
            else:  # the whole response's length, whatever the selector kept of it
                w = position_weight(np.flatnonzero(kept_here), len(y), *pw)  # (kept,)
                part = (per * torch.from_numpy(w).to(per)).sum() / (len(y) * n_seqs)
            part.backward()
        total += part.item()  # .item(): part still carries its graph's grad_fn
    optimizer.step()
    return {"loss": total, "kept": n_kept, "positions": len(sample), "mean_fkl": float(flat["fkl"].mean())}


def _optimizer_tensors(student, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in student.named_parameters():
        state = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in state:
                out[f"{name}.{k}"] = torch.as_tensor(state[k]).detach().cpu().contiguous()
    return out


def load_optimizer(student, optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    for name, p in student.named_parameters():
        if f"{name}.exp_avg" in tensors:
            optimizer.state[p] = {k: tensors[f"{name}.{k}"].to(p.device) for k in ("exp_avg", "exp_avg_sq")}
            optimizer.state[p]["step"] = tensors[f"{name}.step"]


def save_checkpoint(out: Path, student, tok, optimizer, record: dict) -> None:
    """One complete set, the weights, the AdamW state and the train record (steps_done), written
    together into model.tmp/ (the record last) and published as model/ by one folder swap
    (runfolder.publish_folder): the three can never disagree, and a kill at any point leaves a
    complete set that recover_checkpoint finds. train.json beside it is a copy for people."""
    tmp = out / (MODEL + ".tmp")
    discard_tree(tmp)
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / STATE).mkdir()
    save_file(_optimizer_tensors(student, optimizer), str(tmp / STATE / "optimizer.safetensors"))
    text = json.dumps(record, indent=2, default=str) + "\n"
    fsync_tree(tmp)  # the weights on disk before the record that says they are (a power cut, not only a kill)
    _atomic_write(tmp / STATE / "train.json", text)  # last: its presence marks the set complete
    publish_folder(tmp, out / MODEL)
    _atomic_write(out / "train.json", text)


def _saved_record(folder: Path) -> dict | None:
    """The train record of a complete saved set, or None (absent, unfinished or unreadable)."""
    try:
        record = json.loads((folder / STATE / "train.json").read_text())
        int(record["steps_done"]), dict(record["options"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_checkpoint(out: Path) -> dict | None:
    """The train record of the newest complete set in `out`, made model/ again if a save was cut
    between its two renames; leftovers of unfinished saves are removed. None: nothing saved yet."""
    found = [(rec["steps_done"], folder) for folder in (out / MODEL, out / (MODEL + ".tmp"), out / (MODEL + ".old"))
             if (rec := _saved_record(folder)) is not None]
    if not found:
        return None
    _, best = max(found, key=lambda f: int(f[0]))
    if best.name.endswith(".tmp"):
        publish_folder(best, out / MODEL)
    elif best.name.endswith(".old"):  # model/ is missing or unfinished: the previous set is the last one
        discard_tree(out / MODEL)
        os.replace(best, out / MODEL)
    for leftover in (MODEL + ".tmp", MODEL + ".old", MODEL + ".trash"):
        discard_tree(out / leftover)
    return _saved_record(out / MODEL)


