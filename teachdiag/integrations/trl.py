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

- TAOPDDistillationTrainer (trl.DistillationTrainer, on-policy, a completion mask). The rollout batch
  is the generation batch (gradient_accumulation_steps micro-batches, generated at once): after
  generation the student (the weights the loss will see) and the teacher score its completions,
  the rule picks over the whole batch (each process's own, under several processes), and the kept
  positions go into `tool_mask`, which TRL 1.16 reads only as a loss mask (loss_mask =
  completion_mask · tool_mask; attention still sees every token).
  num_items_in_batch becomes the global kept count, so TRL's sum / num_items_in_batch is the loss
  normalised by the kept positions, gradient accumulation included. Cost: one extra no-grad
  forward of each model over the generation batch (TRL's own loss never forms full logits).
- TAOPDGKDTrainer (trl.experimental.gkd.GKDTrainer). Its loss drops positions whose label is −100;
  here the positions not kept get −100 too, and the loss is the JSD summed over the kept positions
  divided by their count, per micro-batch (GKD generates per micro-batch, so that is the rollout
  batch); with gradient accumulation the micro-batch losses are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from trl import DistillationTrainer
from trl.experimental.gkd import GKDTrainer

from teachdiag.errors import InputError
from teachdiag.integrations.select import Selection, selection_stats
from teachdiag.selectors import response_signals

__all__ = ["Selection", "TAOPDMixin", "TAOPDDistillationTrainer", "TAOPDGKDTrainer"]


class TAOPDMixin:
    """The selection shared by both trainers: `selection` settings, `select` on logits, the log."""

    def __init__(self, *args, selection: Selection | None = None, **kwargs) -> None:
        self.selection = selection or Selection()
        self.selection_log: list[dict] = []
        super().__init__(*args, **kwargs)

    def select(self, pieces: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               valid: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions the loss keeps. pieces: (student_logits (b, T, V), teacher_logits
        (b, T, V), response (b, T) bool) for consecutive rows of the batch, scored piece by piece so
        a whole rollout batch's logits never sit in memory at once; valid: (B, T) bool, the response
        positions the loss may train on. Selected over the whole batch."""
        sel, parts, rows = self.selection, [], []
        for s, t, response in pieces:  # a list, or a generator that computes each piece's logits
            sig = response_signals(s, t, response, sel.top_k, signals=sel.signals)
            sig["sample"] = sig["sample"] + sum(len(r) for r in rows)  # rows of the whole batch
            parts.append(sig)
            rows.append(response)
        sig = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
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


class TAOPDDistillationTrainer(TAOPDMixin, DistillationTrainer):
    """trl.DistillationTrainer whose loss keeps only the selected completion positions (module docstring)."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if any(k in out for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "num_images")):
            raise InputError("TA-OPD selection scores text-only batches; this one has images", field="train_dataset")
        completion = out["completion_mask"].bool()  # (G, C), right-padded completions
        valid = completion & out["tool_mask"].bool() if "tool_mask" in out else completion
        keep = self.select(self._scored_pieces(out), valid)  # (G, C)
        out["tool_mask"] = keep.long()
        out["num_items_in_batch"] = self.accelerator.gather(keep.sum()).sum()
        return out

    def _scored_pieces(self, out: dict):
        """(student, teacher, completion) logits of the generation batch, per_device_train_batch_size
        rows at a time: the same forward TRL's loss runs (ids and attention mask, no position ids)."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)  # (G, P + C)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        n = out["completion_ids"].shape[1]
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        step = self.args.per_device_train_batch_size
        for a in range(0, ids.shape[0], step):
            with torch.no_grad():
                z = [self._completion_logits(m, ids[a : a + step], att[a : a + step], n) for m in (student, teacher)]
            v = min(z[0].shape[-1], z[1].shape[-1])  # TRL checks the vocabularies match; padded rows may not
            yield z[0][..., :v], z[1][..., :v], out["completion_mask"][a : a + step].bool()

    def _completion_logits(self, model, ids: torch.Tensor, att: torch.Tensor, n: int) -> torch.Tensor:
        """(b, n, V) float32 logits predicting the n completion tokens."""
        kwargs = {"logits_to_keep": n + 1} if "logits_to_keep" in self.model_kwarg_keys else {}
        logits = model(input_ids=ids, attention_mask=att, use_cache=False, **kwargs).logits
        return logits[:, -(n + 1) : -1].float()  # the last position predicts past the completion


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
            keep = self.select([(student_logits, teacher_logits, response)], response)
            labels = labels.masked_fill(~keep, -100)
            num_items_in_batch = None  # batchmean: the sum over kept positions / their count
        return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                               reduction, num_items_in_batch)
