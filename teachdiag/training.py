"""One OPD training step and the trainer's crash-safe checkpoint: the library under `teachdiag train`.

    from teachdiag.training import train_step, save_checkpoint, recover_checkpoint, load_optimizer
    row = train_step(student, teacher, ctxs, batch=[0, 1], vocab=V, loss="sampled_token", select="teachability",
                     budget=0.05, top_k=16, optimizer=opt, device="cpu")   # {"loss", "kept", "positions", "mean_fkl"}
    save_checkpoint(output, student, tok, opt, record) # model/ with train_state/, published by one folder swap
    record = recover_checkpoint(output)                # the newest complete set's record, or None

`output` is the train run's runfolder.RunOutput: the set is written and swapped in through it.

A step scores every response position of the batch with teacher and student, keeps the positions
the selector picks over the whole batch (scores.keep_positions) and takes one optimizer step on the
OPD loss of the kept positions, normalised by their number (DESIGN "The trainer and the selectors").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from teachdiag.probe.forward import teacher_logits, trim_heap
from teachdiag.probe.fused import grads_in_place
from teachdiag.probe.signals import (at_token, clipped_fkl, probe_loss, restrict, signals_from_logits,
                                     token_index)
from teachdiag.runfolder import RunOutput
from teachdiag.scores import keep_positions, position_weight

TRAIN_LOSSES = ("sampled_token", "reverse_kl", "clipped_fkl")
MODEL, STATE = "model", "train_state"  # <out>/model/train_state/: the optimizer and step of those weights
MASTER = "weights.safetensors"  # in train_state/: the float32 weights, when model/ holds them rounded


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


SCORES = ("topk_entropy", "union_fkl", "compat_mass", "fkl")  # what keep_positions reads of the signals


def sampled_token_loss(student_logits: torch.Tensor, teacher_logprob: torch.Tensor, token_ids: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) float64 sampled-token loss −sg(log p_T(y) − log p_S(y))·log p_S(y) from the teacher's
    log p_T(y) alone ((P,) float64, the signals' teacher_logprob): probe_loss(..., "sampled_token",
    reduce=False) op for op, without the teacher's (P, V) logits."""
    lp_s = at_token(F.log_softmax(restrict(student_logits, keep), -1), token_index(token_ids, keep))
    return -(teacher_logprob - lp_s).detach() * lp_s


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
    mask, B' the sequences with a kept position (the paper's per-sequence mean, then batch mean).

    Memory: one context's (R, V) teacher logits at a time, never the batch's (its scores' float64
    passes run signals.chunk_rows(V) rows at a time). A first pass scores each context (teacher and student forwards, no
    gradient) and keeps only (R,) arrays; the selector then picks over the whole batch; a second
    pass takes each context's loss and backward, the embedding's and head's weight gradients added
    into .grad in place (probe/fused.py: no (V, d) temporaries; the same sums in another order).
    Of the teacher, sampled_token needs only log p_T(y), kept from the first pass; reverse_kl and
    clipped_fkl need whole rows, so the teacher runs again on each context with a kept position:
    those two losses cost twice the teacher forwards of holding the batch's logits, unless
    select="all", whose mask needs no scores, so each context's loss follows its scoring at once
    (one teacher forward). The numbers are those of holding the batch's logits, bit for bit on
    CPU (tests/test_train.py keeps that algorithm as the reference).
    """
    optimizer.zero_grad(set_to_none=True)  # the last step's gradient is not held through this one's scoring
    trainable = [p for p in student.parameters() if p.requires_grad]
    contexts = [ctxs[c] for c in batch]
    lengths = [len(ctx.response_ids) for ctx in contexts]
    ends = np.cumsum(lengths)  # context i's rows are ends[i] - lengths[i] : ends[i] of the batch's rows
    views = []  # per context: ids (T,) the student's input, at (R,) the indices predicting y, y (R,)
    for ctx in contexts:
        n = len(ctx.prompt_ids)
        views.append((torch.tensor(ctx.prompt_ids + ctx.response_ids[:-1], device=device),
                      torch.arange(n - 1, n - 1 + len(ctx.response_ids), device=device),
                      torch.tensor(ctx.response_ids, device=device)))
    # sampled_token cannot train where the sampled token is outside the shared ids (its loss is NaN)
    valid = (torch.cat([keep[y] for _, _, y in views]).cpu().numpy() if loss == "sampled_token" and keep is not None
             else np.ones(int(ends[-1]), bool))

    def logits(ids, at):  # (R, V) float32 student logits at the response positions
        return student(input_ids=ids[None], logits_to_keep=at, use_cache=False).logits[0, :, :vocab].float()

    def teacher_rows(i):  # (R, V) float32: one teacher forward of context i
        return teacher_logits(teacher, contexts[i], list(range(lengths[i])), vocab, device)

    kept = n_kept = n_seqs = None  # (N,) bool, the kept rows; their number; B', the sequences with one

    def counts(rows: np.ndarray) -> tuple[int, int]:
        return int(rows.sum()), sum(bool(m.any()) for m in np.split(rows, ends[:-1]))

    def backward(i, t, lp_t) -> float:
        """Context i's share of the batch loss, back-propagated; t: its (R, V) teacher logits, or
        None for sampled_token, which reads lp_t, its (R,) log p_T(y)."""
        ids, at, y = views[i]
        kept_here = kept[ends[i] - lengths[i] : ends[i]]
        mask = torch.from_numpy(kept_here).to(device)
        if not mask.any():
            return 0.0
        # the embedding's and head's weight gradients into .grad in place, without (V, d) temporaries
        with torch.enable_grad(), grads_in_place(student, trainable):
            z = logits(ids, at)[mask]  # (kept, V)
            if t is None:
                per = sampled_token_loss(z, lp_t[mask], y[mask], keep)  # (kept,)
            else:
                per = opd_loss(z, t[mask], y[mask], loss, keep, kl_clip, loss_temperature)  # (kept,)
            if pw is None:
                part = per.sum() / n_kept  # normalised by the kept positions of the whole batch
            else:  # the whole response's length, whatever the selector kept of it
                w = position_weight(np.flatnonzero(kept_here), len(y), *pw)  # (kept,)
                part = (per * torch.from_numpy(w).to(per)).sum() / (len(y) * n_seqs)
            part.backward()
        return part.item()  # .item(): part still carries its graph's grad_fn

    at_once = select == "all"  # the mask is the trainable rows: each context's backward right after its scoring
    if at_once:
        kept = valid
        n_kept, n_seqs = counts(kept)
    sig = {k: [] for k in SCORES}  # per context: (R,) float64 numpy
    lp_teacher = []  # per context: (R,) float64 log p_T(y), all that sampled_token's loss needs of the teacher
    total = 0.0
    for i, (ids, at, y) in enumerate(views):  # the first pass: the selector's scores at θ, no gradient
        t = teacher_rows(i)  # (R, V)
        with torch.no_grad():
            z = logits(ids, at)  # (R, V)
            s = signals_from_logits(z, t, y, top_k, keep=keep, mode=select_signals)  # chunked inside: bounded float64
            del z
        for k in sig:
            sig[k].append(s[k].cpu().numpy())
        lp_teacher.append(s["teacher_logprob"])
        if loss == "sampled_token":
            t = None  # all its loss needs of the teacher is in lp_teacher: the rows go before the backward
        if at_once:
            total += backward(i, t, lp_teacher[i])
        del t  # before the next context's forward: one context's logits alive at a time
        trim_heap()  # and the pages of what this context freed back to the OS (probe/forward.py)

    flat = {k: np.concatenate(v) for k, v in sig.items()}
    flat["position"] = np.concatenate([np.arange(n) for n in lengths])  # (N,) j within its response
    flat["response_length"] = np.concatenate([np.full(n, n) for n in lengths])
    flat["sample"] = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    if not at_once:
        if select_rule == "paper_text":  # as teachdiag 0.2: select over every row, then drop the untrainable
            kept = keep_positions(flat, select, budget, rule=select_rule, seed=seed) & valid
        else:  # the released rule counts, ranks and fills among the trainable rows (its loss mask)
            kept = keep_positions(flat, select, budget, valid, rule=select_rule, seed=seed)
        n_kept, n_seqs = counts(kept)
        for i in range(len(views)):  # the second pass: each context's loss and backward
            if kept[ends[i] - lengths[i] : ends[i]].any():
                t = None if loss == "sampled_token" else teacher_rows(i)  # (R, V) again: the full-row losses
                total += backward(i, t, lp_teacher[i])
                del t
                trim_heap()
    optimizer.step()
    return {"loss": total, "kept": n_kept, "positions": int(ends[-1]), "mean_fkl": float(flat["fkl"].mean())}


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


def save_checkpoint(output: RunOutput, student, tok, optimizer, record: dict,
                    dtype: torch.dtype = torch.float32) -> None:
    """One complete set, the weights, the AdamW state and the train record (steps_done), written
    together into model.tmp/ (the record last) and published as model/ by one folder swap
    (output.publish): the three can never disagree, and a kill at any point leaves a complete set
    that recover_checkpoint finds. The run record beside it (train.json) is the command's to write.

    dtype: of model/'s weights. The student trains in float32; with a narrower dtype model/ holds
    the weights rounded (a copy to serve or probe) and train_state/weights.safetensors the float32
    weights themselves, which --resume reads (load_master): AdamW's updates at lr 1e-6 are far
    below a bf16 ulp, so weights resumed from the rounded copy would not be the uninterrupted run's.

    Disk: the new set is written beside the last one and the last is deleted only after the swap,
    so from the second save on a save needs two sets for a moment: 2 × 12 bytes a parameter in
    float32 (weights, AdamW's two moments), 2 × 14 with a bfloat16 model/ (its float32 master
    added). Less is not crash-safe: every file of a set changes at every step (the moments too),
    so nothing of the last set can be kept, and writing over it in place would leave, at a kill,
    a mix of two steps and no complete set. checkpoint_bytes gives a set's size."""
    tmp = output.path(MODEL + ".tmp")
    output.remove(MODEL + ".tmp")  # a killed save's leftovers
    if dtype == torch.float32:
        student.save_pretrained(tmp)
    else:
        rounded: dict = {}  # one copy per tensor, so tied weights stay one tensor (saved once)
        state = {}
        for name, v in student.state_dict().items():
            key = (v.data_ptr(), tuple(v.shape))
            if key not in rounded:
                rounded[key] = v.to(dtype) if v.is_floating_point() else v
            state[name] = rounded[key]
        student.save_pretrained(tmp, state_dict=state)
        del rounded, state
        config = json.loads((tmp / "config.json").read_text())  # save_pretrained writes the model's own dtype
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(tmp)
    (tmp / STATE).mkdir()
    if dtype != torch.float32:
        save_file({name: p.detach().cpu().contiguous() for name, p in student.named_parameters()},
                  str(tmp / STATE / MASTER))
    save_file(_optimizer_tensors(student, optimizer), str(tmp / STATE / "optimizer.safetensors"))
    # the record last, once the weights are on disk (a power cut, not only a kill): its presence marks the set complete
    output.publish(MODEL + ".tmp", MODEL, last=(f"{STATE}/train.json", json.dumps(record, indent=2, default=str) + "\n"))


def checkpoint_bytes(student, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one saved set's tensors: the weights in `dtype`, AdamW's two float32 moments and,
    when `dtype` is narrower than float32, the float32 master (save_checkpoint); tied weights once."""
    n = sum(p.numel() for p in student.parameters())  # parameters() yields a tied tensor once
    return n * (dtype.itemsize + 8 + (4 if dtype != torch.float32 else 0))


def load_master(student, folder: Path) -> bool:
    """Copy a saved set's float32 master weights (folder/train_state/weights.safetensors) into the
    student; False when the set has none: its model/ weights are float32 and are the master."""
    path = folder / STATE / MASTER
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(tensors[name])
    return True


def _saved_record(folder: Path) -> dict | None:
    """The train record of a complete saved set, or None (absent, unfinished or unreadable)."""
    try:
        record = json.loads((folder / STATE / "train.json").read_text())
        int(record["steps_done"]), dict(record["options"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_checkpoint(output: RunOutput) -> dict | None:
    """The train record of the newest complete set in the output's folder, made model/ again if a save
    was cut between its two renames; leftovers of unfinished saves are removed. None: nothing saved yet."""
    out = output.folder
    found = [(rec["steps_done"], folder) for folder in (out / MODEL, out / (MODEL + ".tmp"), out / (MODEL + ".old"))
             if (rec := _saved_record(folder)) is not None]
    if not found:
        return None
    _, best = max(found, key=lambda f: int(f[0]))
    if best.name.endswith(".tmp"):
        output.publish(best, MODEL)
    elif best.name.endswith(".old"):  # model/ is missing or unfinished: the previous set is the last one
        output.remove(MODEL)
        output.move(best, MODEL)
    output.remove(MODEL + ".tmp", MODEL + ".old", MODEL + ".trash")
    return _saved_record(out / MODEL)


