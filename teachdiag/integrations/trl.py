"""TA-OPD inside TRL's distillation trainers (pip install teachdiag[trl]; written against TRL 1.16).

    from trl import DistillationConfig
    from teachdiag.integrations.trl import Selection, TAOPDDistillationTrainer, TAOPDGKDTrainer
    trainer = TAOPDDistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                       train_dataset=prompts, processing_class=tokenizer,
                                       selection=Selection(selector="teachability", budget=0.05))
    trainer.train()
    trainer.selection_log   # one dict per selected batch: step, kept, positions, teachability_kept, ...

Both trainers keep only the positions the selector picks (integrations/select.py: the released
TA-OPD rule by default, every selector of scores.SELECTORS) and divide the loss by the kept count.
Each selection is logged with the trainer's own metrics (ta_opd/kept, ta_opd/kept_fraction,
ta_opd/teachability_kept vs ta_opd/teachability_all, ta_opd/compat_kept vs ta_opd/compat_all) and
kept in `selection_log`. Evaluation losses are left unmasked: they measure distillation on every token.
Both select on the T = 1 distributions (as ta_opd_mask and the probe do), whatever temperature
the config gives the loss.

- TAOPDDistillationTrainer (trl.DistillationTrainer, on-policy, a completion mask). The rollout batch
  is the generation batch (gradient_accumulation_steps micro-batches, generated at once): after
  generation the student (the weights the loss will see) and the teacher score its completions,
  the rule picks over the whole batch (each process's own, under DDP), and the kept positions go
  into `tool_mask`, which TRL 1.16 reads only as a loss mask (loss_mask = completion_mask ·
  tool_mask; attention still sees every token). num_items_in_batch becomes the global kept count,
  so TRL's sum / num_items_in_batch is the loss normalised by the kept positions, gradient
  accumulation included.
  The scoring is TRL's own backbone call (DistillationTrainer._get_last_hidden_state), without
  gradient and with the student in eval mode (no dropout), per_device_train_batch_size rows at a
  time; the completion positions' hidden states then go through each lm_head `score_chunk`
  positions at a time, with the logit scale and soft-capping TRL's loss applies, so full (b, C, V)
  logits never exist. Peak memory of the selection, beyond the no-grad backbone forward itself: the
  two models' last hidden states of one slab, b·C·(H_student + H_teacher) in the model dtype, plus
  about score_chunk·V·70 bytes for the projection and probe/signals.signals_from_logits (two float32
  logit chunks and its float64 (score_chunk, V) arrays; 1.22 GB measured at score_chunk = 128,
  V = 152k), whatever b and C are. Scoring whole (b, C, V) float32 logits would hold ~10 GB per
  model at b = 4, C = 4096, V = 152k.
  Side effect: TRL's `entropy` metric averages over the loss mask, so over the kept positions only.
  Single process or DDP only: the scoring calls the unwrapped models, whose parameters FSDP and
  DeepSpeed ZeRO-3 shard, so the trainer refuses both when it is made (InputError).
- TAOPDGKDTrainer (trl.experimental.gkd.GKDTrainer). Its loss drops positions whose label is −100;
  here the positions not kept get −100 too, and the loss is the JSD summed over the kept positions
  divided by their count, per micro-batch (GKD generates per micro-batch, so that is the rollout
  batch); with gradient accumulation the micro-batch losses are averaged. The selection reads the
  logits of GKD's own loss forward (train mode: with dropout where the model has any), so it adds
  no forward and calls no model itself: nothing in it depends on how the model is sharded (tested
  single-process only).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from trl import DistillationTrainer
from trl.experimental.gkd import GKDTrainer

from teachdiag.errors import InputError
from teachdiag.integrations.select import Selection, response_rows, selection_stats
from teachdiag.probe.signals import signals_from_logits
from teachdiag.selectors import response_signals

__all__ = ["Selection", "TAOPDMixin", "TAOPDDistillationTrainer", "TAOPDGKDTrainer"]

SIGNALS = ("topk_entropy", "union_fkl", "compat_mass", "fkl")  # what selectors.response_signals keeps


class TAOPDMixin:
    """The selection shared by both trainers: `selection` settings, `select` on signals, the log."""

    def __init__(self, *args, selection: Selection | None = None, **kwargs) -> None:
        self.selection = selection or Selection()
        self.selection_log: list[dict] = []
        super().__init__(*args, **kwargs)

    def select(self, parts: Iterable[tuple[dict[str, np.ndarray], torch.Tensor]], valid: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions the loss keeps. parts: (signals, response) for consecutive rows
        of the batch, response (b, T) bool and signals the (N_b,) arrays of its response positions
        (selectors.response_signals); valid: (B, T) bool, the response positions the loss may train
        on. Selected over the whole batch."""
        sel, sigs, rows = self.selection, [], []
        for sig, response in parts:
            sigs.append(dict(sig, sample=sig["sample"] + sum(len(r) for r in rows)))  # rows of the whole batch
            rows.append(response)
        sig = {k: np.concatenate([p[k] for p in sigs]) for k in sigs[0]}
        response = torch.cat(rows)  # (B, T)
        where = response.nonzero(as_tuple=False)  # (N, 2) row-major: the rows of sig
        ok = valid.bool()[where[:, 0], where[:, 1]].cpu().numpy()
        keep = sel.keep(sig, ok)
        self._log_selection(selection_stats(sig, keep, ok, sel))
        mask = torch.zeros(response.shape, dtype=torch.bool, device=response.device)
        mask[where[:, 0], where[:, 1]] = torch.from_numpy(keep).to(mask.device)
        return mask

    def _log_selection(self, stats: dict[str, float]) -> None:
        self.selection_log.append({"step": self.state.global_step + 1, **stats})  # the step it trains
        for name, value in stats.items():  # averaged over the logging window by the trainer's log()
            self._metrics["train"][f"ta_opd/{name}"].append(float(value))


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) of a model's logits, read from its text config as TRL's
    DistillationTrainer._compute_loss reads them (Cohere's logit_scale, Granite's logits_scaling, ...)."""
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits from (n, H) last hidden states: the output embedding, then the scale and
    the soft-capping TRL's loss applies (logit_transform)."""
    z = model.get_output_embeddings()(hidden).float()
    scale, softcap = logit_transform(model.config.get_text_config())
    z = z * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


class TAOPDDistillationTrainer(TAOPDMixin, DistillationTrainer):
    """trl.DistillationTrainer whose loss keeps only the selected completion positions (module docstring)."""

    # completion positions projected to logits at a time: the selection's peak memory (module docstring)
    score_chunk = 128

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._refuse_sharded()

    def _refuse_sharded(self) -> None:
        """The scoring forward calls the unwrapped models: under FSDP or DeepSpeed they hold shards."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise InputError("TAOPDDistillationTrainer runs single-process or under DDP only, not FSDP or "
                             "DeepSpeed (its scoring forward calls the unwrapped models); TAOPDGKDTrainer "
                             "selects inside GKD's own loss forward instead", field="accelerator")

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if any(k in out for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "num_images")):
            raise InputError("TA-OPD selection scores text-only batches; this one has images", field="train_dataset")
        completion = out["completion_mask"].bool()  # (G, C), right-padded completions
        valid = completion & out["tool_mask"].bool() if "tool_mask" in out else completion
        keep = self.select(self._scored_slabs(out), valid)  # (G, C)
        out["tool_mask"] = keep.long()
        out["num_items_in_batch"] = self.accelerator.gather(keep.sum()).sum()
        return out

    def _scored_slabs(self, out: dict) -> list[tuple[dict[str, np.ndarray], torch.Tensor]]:
        """(signals, completion (b, C) bool) of the generation batch, per_device_train_batch_size rows at
        a time: the backbone call of TRL's loss (ids and attention mask, no position ids), without
        gradient and without dropout."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)  # (G, P + C)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        n = out["completion_ids"].shape[1]
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()  # as TRL's loss has it
        was_training = student.training
        student.eval()  # dropout would make the selection read a noisy copy of the student
        slabs = []
        try:
            step = self.args.per_device_train_batch_size
            for a in range(0, ids.shape[0], step):
                completion = out["completion_mask"][a : a + step].bool()  # (b, C)
                with torch.no_grad():  # (b, C, H) each: the states that predict the completion tokens
                    h_s = self._get_last_hidden_state(student, ids[a : a + step], att[a : a + step], n)
                    h_t = self._get_last_hidden_state(teacher, ids[a : a + step], att[a : a + step], n)
                    slabs.append((self.completion_signals(student, teacher, h_s, h_t, completion), completion))
        finally:
            student.train(was_training)
        return slabs

    def completion_signals(self, student, teacher, h_s: torch.Tensor, h_t: torch.Tensor,
                           completion: torch.Tensor) -> dict[str, np.ndarray]:
        """selectors.response_signals of one slab from the last hidden states h_s (b, C, H_s) and h_t
        (b, C, H_t) instead of (b, C, V) logits: the completion positions ((b, C) bool) go through each
        lm_head score_chunk positions at a time, so only (score_chunk, V) logits exist at once."""
        where, rows = response_rows(completion)  # (N, 2) row-major
        h_s, h_t = h_s[where[:, 0], where[:, 1]], h_t[where[:, 0], where[:, 1]]  # (N, H_s), (N, H_t)
        parts = []
        for a in range(0, len(where), self.score_chunk):
            z_s = head_logits(student, h_s[a : a + self.score_chunk])  # (c, V_s) float32
            z_t = head_logits(teacher, h_t[a : a + self.score_chunk])  # (c, V_t)
            v = min(z_s.shape[-1], z_t.shape[-1])  # TRL checks the vocabularies match; padded rows may not
            z_s, z_t = z_s[:, :v], z_t[:, :v]
            parts.append(signals_from_logits(z_s, z_t, z_s.argmax(-1), self.selection.top_k,
                                             mode=self.selection.signals))
        sig = {k: torch.cat([p[k] for p in parts]).cpu().numpy() if parts else np.zeros(0) for k in SIGNALS}
        return sig | rows


class TAOPDGKDTrainer(TAOPDMixin, GKDTrainer):
    """GKDTrainer whose JSD keeps only the selected positions (module docstring)."""

    # the loss is a micro-batch mean over its kept positions: Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
        """GKDTrainer's loss with the positions not kept labelled −100, normalised by the kept count.
        student_logits, teacher_logits: (B, T, V) shifted; labels: (B, T), −100 off the completions."""
        if labels is not None and self.model.training:
            response = labels != -100  # (B, T)
            sel = self.selection
            sig = response_signals(student_logits, teacher_logits, response, sel.top_k, signals=sel.signals)
            keep = self.select([(sig, response)], response)
            labels = labels.masked_fill(~keep, -100)
            num_items_in_batch = None  # batchmean: the sum over kept positions / their count
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                               reduction, num_items_in_batch)
