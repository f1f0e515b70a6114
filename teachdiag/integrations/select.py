"""What every trainer integration shares: the selection's settings, the rule applied to a batch's
signal arrays, and the numbers logged about what was kept.

    from teachdiag.integrations.select import Selection, selection_stats
    sel = Selection(selector="teachability", budget=0.05)   # settings, checked when made
    keep = sel.keep(sig, valid)                             # (N,) bool: scores.keep_positions
    selection_stats(sig, keep, valid, sel)                  # kept, positions, teachability/C kept vs all
    where, rows = response_rows(response_mask)              # (N, 2) and sample / position / response_length

`sig` holds (N,) arrays, one row per response token of a rollout batch (selectors.response_signals
from logits, or probe/topk.served_signals from top-K lists): topk_entropy, union_fkl, compat_mass,
sample, position, response_length, and fkl where full distributions were seen. The rule is the
released TA-OPD one by default (DESIGN "The trainer and the selectors"): scores normalised over the
batch, max(1, ceil(ρ·N_valid)) rows of the whole batch, then every sample left without a row gets
its best, beyond the budget. A trainer normalises its loss by the kept count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from teachdiag.errors import InputError
from teachdiag.probe.signals import SIGNAL_MODES
from teachdiag.scores import KEEP_RULES, SELECTORS, keep_positions, selector_scores


@dataclass(frozen=True)
class Selection:
    """Which positions of a rollout batch the loss keeps. selector: scores.SELECTORS; budget ρ in
    (0, 1]; top_k: K of each side's lists; signals: where H, D, C come from when logits are given
    (signals.SIGNAL_MODES; "topk" is the released code's); rule: scores.KEEP_RULES; normalize_over:
    "response" (every response row) or "valid" (the trainable rows only); seed: the random selector's."""

    selector: str = "teachability"
    budget: float = 0.05
    top_k: int = 16
    signals: str = "topk"
    rule: str = "released"
    normalize_over: str = "response"
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"selector": SELECTORS, "signals": SIGNAL_MODES, "rule": KEEP_RULES,
                   "normalize_over": ("response", "valid")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{getattr(self, name)!r} is not one of {', '.join(allowed)}", field=name)
        if not 0 < self.budget <= 1:
            raise InputError(f"must be in (0, 1], got {self.budget}", field="budget")
        if self.top_k < 1:
            raise InputError(f"must be >= 1, got {self.top_k}", field="top_k")

    def keep(self, sig: dict, valid: np.ndarray | None = None) -> np.ndarray:
        """(N,) bool over sig's rows: the rows the loss trains on. valid: (N,) bool, the rows it
        may train on (None: all); only valid rows are ever kept."""
        if self.selector == "fkl" and "fkl" not in sig:
            raise InputError("the fkl selector needs full distributions; top-K lists give no fkl",
                             field="selector")
        return keep_positions(sig, self.selector, self.budget, valid, self.rule, self.seed, self.normalize_over)


def response_rows(response_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(where, rows) of a (B, T) response mask: where (N, 2), its nonzero positions in row-major
    order (the rows of sig), and rows, their sample (the row b), position (index among b's
    response tokens; left padding is fine) and response_length, as selectors.response_signals
    numbers them."""
    on = response_mask.bool()  # (B, T)
    where = on.nonzero(as_tuple=False)
    rows = {"sample": where[:, 0].cpu().numpy(),
            "position": (on.long().cumsum(1) - 1)[where[:, 0], where[:, 1]].cpu().numpy(),
            "response_length": on.sum(1)[where[:, 0]].cpu().numpy()}
    return where, rows


def selection_stats(sig: dict, keep: np.ndarray, valid: np.ndarray | None, sel: Selection) -> dict[str, float]:
    """What a trainer logs about one selection: kept (count), positions (trainable rows), kept_fraction,
    and the mean teachability D̃·C̃ and C of the kept rows beside those of every trainable row.
    Teachability is normalised over the rows the rule normalises over, by the released convention."""
    n = len(keep)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    pop = np.ones(n, bool) if sel.normalize_over == "response" else valid
    teach = np.full(n, np.nan)
    if pop.any():
        sub = {k: np.asarray(v)[pop] for k, v in sig.items()}
        teach[pop] = selector_scores(sub, "teachability", convention="released" if sel.rule == "released"
                                     else "teachdiag")
    c = np.asarray(sig["compat_mass"], dtype=np.float64)
    mean = lambda x, m: float(np.nanmean(x[m])) if m.any() else float("nan")  # noqa: E731
    kept, n_valid = int(keep.sum()), int(valid.sum())
    return {"kept": kept, "positions": n_valid, "kept_fraction": kept / n_valid if n_valid else float("nan"),
            "teachability_kept": mean(teach, keep), "teachability_all": mean(teach, valid),
            "compat_kept": mean(c, keep), "compat_all": mean(c, valid)}

