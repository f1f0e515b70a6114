"""Budgeted selection (DESIGN "Analysis"): what each selector keeps at a fixed share of positions.

    from teachdiag.analysis.selection import selection_table, select_top, selectors_for
    selection_table(add_scores(df), "rel_gain_fkl")   # budgets 1/3/5/10 %, every selector
    selectors_for(df)                                   # name -> column, those df can rank by
    select_top(scores, budget_count(len(scores), 0.05, "ceil"))  # boolean mask (n,)

Rule (default protocol): a selector keeps exactly k = ceil(rho · N) positions of the whole table
(scores.budget_count; global over the table, not per context), highest score first. Ties go to the *earlier* position, where earlier
means table order: contexts in order of first appearance in the table, then ascending `position`
(selection_table sorts the table that way first). NaN scores rank below every number.
The oracle is the same rule applied to the measured gain itself. The paper protocol (paper.py)
keeps k = round(rho · N) instead, as the paper states.
`position` ranks by PW-OPSD's position weight (scores.position_weight: the latest share of each
response first); it needs response_length, and a table without it has no such row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from teachdiag.analysis.bootstrap import group_mean_draws, percentile_ci
from teachdiag.scores import budget_count, keep_positions

BUDGETS = (0.01, 0.03, 0.05, 0.10)
# selector name -> column of a table from analysis.add_scores. "entropy" is the raw top-K entropy
# H: it orders like H̃ but without the tie plateaus that clipping puts at H̃ = 0 and 1.
SELECTORS = {
    "teachability": "teachability", "incompat": "incompat", "fkl": "fkl",
    "union_fkl": "union_fkl", "entropy": "topk_entropy", "student_entropy": "student_entropy",
    "tip": "tip", "teach_entropy": "teach_entropy", "random": "random", "position": "position_weight",
}


def selectors_for(df: pd.DataFrame, selectors: Mapping[str, str] = SELECTORS) -> dict[str, str]:
    """The selectors whose column df has with a value: position_weight exists only where
    response_length does, and a token bank (bank.py) has no full-vocabulary fkl."""
    return {name: col for name, col in selectors.items() if col in df.columns and df[col].notna().any()}


def top_order(scores: np.ndarray) -> np.ndarray:
    """Row indices, highest score first; ties to the lower index; NaN ranks last."""
    s = np.asarray(scores, dtype=float)
    key = np.where(np.isnan(s), -np.inf, s)
    nan_last = np.isnan(s)  # below -inf scores too
    return np.lexsort((np.arange(len(s)), -key, nan_last))  # last key is primary


def select_top(scores: np.ndarray, k: int, order: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask (n,) of the k highest scores; ties to the lower index; NaN ranks last.
    order: top_order(scores), when the caller keeps it for several k."""
    order = top_order(scores) if order is None else order
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:k]] = True
    return mask


def table_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by (context in order of first appearance, position): the tie-break order."""
    ctx = pd.factorize(df["context_id"])[0]
    idx = np.lexsort((df["position"].to_numpy(), ctx))
    return df.iloc[idx].reset_index(drop=True)


def tied_at_cutoff(scores: np.ndarray, mask: np.ndarray) -> int:
    """Kept positions that won their place by the tie-break only (score equal to a dropped one)."""
    if mask.all() or not mask.any():
        return 0
    cut = np.nanmin(scores[mask]) if np.isfinite(scores[mask]).any() else np.nan
    if np.isnan(cut) or not (scores[~mask] == cut).any():
        return 0
    return int((scores[mask] == cut).sum())


def selection_table(df: pd.DataFrame, gain: str, budgets: Sequence[float] = BUDGETS,
                    selectors: Mapping[str, str] = SELECTORS) -> pd.DataFrame:
    """Mean / median gain kept by each selector (plus "oracle") at each budget.

    Rows with a non-finite gain are left out first (N counts the rest). share_of_gain is
    Σ kept gain / Σ all gain (NaN if the latter is 0); overlap_oracle is |kept ∩ oracle| / k;
    tied_at_cutoff counts kept positions chosen by the tie-break alone (a clipped score's plateau).
    A selector whose column the table lacks is left out (position_weight needs response_length).
    Returns rows: gain, budget, selector, n, k, mean_gain, median_gain, share_of_gain,
    overlap_oracle, mean_gain_all, tied_at_cutoff.
    """
    t = table_order(df[np.isfinite(df[gain].to_numpy(float))])
    g = t[gain].to_numpy(float)
    total = g.sum()
    cols = {**selectors_for(t, selectors), "oracle": gain}
    scores = {name: t[col].to_numpy(float) for name, col in cols.items()}
    orders = {name: top_order(s) for name, s in scores.items()}  # one sort each, for every budget
    rows = []
    for rho in budgets:
        k = budget_count(len(t), rho, "ceil")
        oracle = select_top(g, k, orders["oracle"])
        for name, s in scores.items():
            mask = select_top(s, k, orders[name])
            kept = g[mask]
            rows.append((gain, rho, name, len(t), k,
                         kept.mean() if k else np.nan, np.median(kept) if k else np.nan,
                         kept.sum() / total if total != 0 else np.nan,
                         (mask & oracle).sum() / k if k else np.nan,
                         g.mean() if len(g) else np.nan, tied_at_cutoff(s, mask)))
    return pd.DataFrame(rows, columns=["gain", "budget", "selector", "n", "k", "mean_gain",
                                       "median_gain", "share_of_gain", "overlap_oracle",
                                       "mean_gain_all", "tied_at_cutoff"])


# ---------------------------------------------------------------- what a TA-OPD trainer keeps

TA_OPD_SELECTORS = ("teachability", "entropy", "divergence", "tip", "ca_softor", "fkl", "random", "position")


def ta_opd_selection(df: pd.DataFrame, gain: str, budgets: Sequence[float] = BUDGETS, batch: int = 8,
                     seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """What the released TA-OPD rule (scores.ta_opd_keep) keeps at fixed θ0 when the table's
    contexts are trained in batches of `batch` (table order, as `teachdiag train --batch` would
    take them): per batch, max(1, ceil(ρ·N_batch)) positions by the selector's score normalised
    over the batch, then one position for each context left without one. Scores come from the
    table's topk_entropy, union_fkl, compat_mass (the probe's --signals mode). Rows with a
    non-finite gain are left out first. oracle: per batch the same count by the gain itself, no
    fill. fkl (the raw full-vocabulary KL, teachdiag's trainer selector) only where the table has
    it. mean_gain's CI: cluster bootstrap over contexts, n_boot resamples. Returns rows: gain,
    budget, selector, batch, n, k, filled, mean_gain, ci_low, ci_high, median_gain, share_of_gain,
    overlap_oracle, mean_gain_all."""

    t = table_order(df[np.isfinite(df[gain].to_numpy(float))])
    g = t[gain].to_numpy(float)
    ctx = pd.factorize(t["context_id"])[0]
    has_len = "response_length" in t.columns and np.isfinite(t["response_length"].to_numpy(float)).all()
    names = [s for s in TA_OPD_SELECTORS if (s != "position" or has_len) and (s != "fkl" or t["fkl"].notna().all())]
    # each batch's rows (ascending) and signals, once for every budget; one sort, not a pass per batch
    order = np.argsort(ctx // batch, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(ctx[order] // batch)) + 1) if len(t) else []
    cols = {k: t[k].to_numpy(float) for k in ("topk_entropy", "union_fkl", "compat_mass", "fkl")}
    cols |= {"position": t["position"].to_numpy(),
             "response_length": t["response_length"].to_numpy(float) if has_len else np.zeros(len(t))}
    signals = [{"sample": ctx[idx], **{k: v[idx] for k, v in cols.items()}} for idx in groups]
    total, rows = g.sum(), []
    for rho in budgets:
        masks = {name: np.zeros(len(t), bool) for name in [*names, "oracle"]}
        budget_k = 0
        for i, (idx, sig) in enumerate(zip(groups, signals)):
            for name in names:
                masks[name][idx] = keep_positions(sig, name, rho, seed=seed + i)
            k = budget_count(len(idx), rho, "released")
            budget_k += k
            masks["oracle"][idx[select_top(g[idx], k)]] = True
        draws = group_mean_draws(g, np.stack(list(masks.values())), ctx, n_boot, seed)
        for i, (name, m) in enumerate(masks.items()):
            kept = g[m]
            ci = percentile_ci(draws[:, i]) if len(draws) else (np.nan, np.nan)
            rows.append((gain, rho, name, batch, len(t), int(m.sum()), int(m.sum()) - budget_k,
                         kept.mean() if len(kept) else np.nan, *ci, np.median(kept) if len(kept) else np.nan,
                         kept.sum() / total if total != 0 else np.nan,
                         (m & masks["oracle"]).sum() / m.sum() if m.any() else np.nan, g.mean() if len(g) else np.nan))
    return pd.DataFrame(rows, columns=["gain", "budget", "selector", "batch", "n", "k", "filled", "mean_gain",
                                       "ci_low", "ci_high", "median_gain", "share_of_gain", "overlap_oracle",
                                       "mean_gain_all"])
