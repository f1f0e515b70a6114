"""The paper's diagnostic protocol (DESIGN "Analysis"; the paper's text and released analysis), exactly as stated: pure functions over a table.

    from teachdiag.analysis.paper import paper_scores, paper_ols, paper_q3, paper_bins, paper_selection
    t = paper_scores(load_run("runs/r1")["table"])          # needs the response_length column
    paper_ols(t, "G_KLf"); paper_q3(t, "G_KLf"); paper_bins(t, "G_KLf"); paper_selection(t, "G_KLf")

Variables (all from θ0, normalized over the whole table):
    H = student_entropy (full vocabulary), D = fkl, C = compat_mass, Ht = teacher_entropy,
    pos_norm = position / (response_length − 1)                    (0 for a one-token response)
    Norm(z) = clip((z − q05) / (q95 − q05), 0, 1), 0 where q95 − q05 < 1e-12 (paper_norm)
    Hn, Dn, Cn, Htn; DL = Dn·Cn; DI = Dn·(1 − Cn); TIP = Hn + Dn − Hn·Dn; H_teach = Hn + DL − Hn·DL
    position_weight = PW-OPSD's w_t of (position, response_length) (scores.position_weight), a
    selector beside the paper's (arXiv 2605.21606 trains on it; the paper tested here does not)
Gains: G_KLf = (fkl − fkl_after) / (fkl + 1e-12), the paper's relative drop, and drop_fkl =
fkl − fkl_after, the absolute drop of its Eq. 1. These differ from teachdiag's default protocol
(topk_entropy, union_fkl, rel_gain_fkl = NaN where fkl is 0): DESIGN "Analysis" keeps both definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from teachdiag.analysis.bootstrap import group_mean_draws, percentile_ci
from teachdiag.analysis.minimum import ci_note, too_few
from teachdiag.analysis.selection import select_top, table_order, tied_at_cutoff
from teachdiag.analysis.stats import bin_table, equal_count_bins, matched_pairs, ols_models, tercile_gap, winsorize
from teachdiag.scores import budget_count, position_weight, quantile_normalize, soft_or
from teachdiag.table import pos_norm
from teachdiag.errors import InputError

EPS = 1e-12  # the paper's threshold of Norm and the guard of G_KLf's denominator
PAPER_GAINS = ("G_KLf", "drop_fkl")
PAPER_MODELS = {  # the paper's order; ΔR² of the others is against the first
    "base": ["Hn", "Dn", "Hn:Dn", "pos_norm", "Htn"],
    "base+C": ["Hn", "Dn", "Hn:Dn", "Cn", "pos_norm", "Htn"],
    "decomposition": ["Hn", "DL", "DI", "pos_norm", "Htn"],
}
BIN_SCORES = ("Cn", "DL", "DI", "TIP", "H_teach")
RESIDUALIZE_ON = ("Hn", "Dn", "pos_norm", "Htn")
PAPER_BUDGETS = (0.01, 0.03, 0.05, 0.10)
# selector -> column. Raw KL and entropy rank by the raw fkl and student_entropy: the same order
# as Dn and Hn, without the tie plateau that clipping puts at Dn = 1 (the top 5% of rows).
PAPER_SELECTORS = {"teachability": "DL", "raw KL": "fkl", "TIP": "TIP", "H+teach": "H_teach",
                   "entropy": "student_entropy", "random": "random", "position": "position_weight"}


def paper_norm(x: np.ndarray) -> np.ndarray:
    """Norm(z) over the finite values of x (n,): clip((z − q05)/(q95 − q05), 0, 1), 0 where
    q95 − q05 < 1e-12 (the paper's rule: scores.quantile_normalize with eps = 1e-12).
    Quantiles by numpy's default (linear) method; NaN stays NaN."""
    return quantile_normalize(x, EPS)


def paper_scores(df: pd.DataFrame, seed: int = 0, source: str = "table") -> pd.DataFrame:
    """Copy of df (table order) with the paper's variables and gains (module docstring) and a seeded
    uniform `random` score. Raises InputError (file = source) when response_length is missing or
    not above every position, or when the table has no measured fkl_after."""
    if "response_length" not in df.columns or df["response_length"].isna().all():
        raise InputError("the paper protocol needs the response length of every context for "
                         "pos_norm (a column written by newer probes; for an old demo table see "
                         "--response-lengths)", file=source, field="response_length")
    t = table_order(df)
    length, pos = t["response_length"].to_numpy(float), t["position"].to_numpy(float)
    bad = ~(pos < length)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"position {pos[i]:g} is not below the response length {length[i]:g} "
                         f"(context {t['context_id'].iloc[i]})", file=source, field="response_length")
    if not np.isfinite(t["fkl_after"].to_numpy(float)).any():
        raise InputError("no measured fkl_after: the paper's gain is a measured drop (a --mode "
                         "linear run has only gain_first_order)", file=source, field="fkl_after")
    fkl = t["fkl"].to_numpy(float)
    hn, dn, cn = (paper_norm(t[c]) for c in ("student_entropy", "fkl", "compat_mass"))
    dl = dn * cn
    return t.assign(
        Hn=hn, Dn=dn, Cn=cn, Htn=paper_norm(t["teacher_entropy"]), pos_norm=pos_norm(pos, length),
        DL=dl, DI=dn * (1 - cn), TIP=soft_or(hn, dn), H_teach=soft_or(hn, dl),
        position_weight=position_weight(pos, length),
        G_KLf=(fkl - t["fkl_after"].to_numpy(float)) / (fkl + EPS),
        drop_fkl=fkl - t["fkl_after"].to_numpy(float),
        random=np.random.default_rng(seed).random(len(t)))


def _finite(t: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    return t[np.isfinite(t[list(cols)].to_numpy(float)).all(axis=1)]


# ---------------------------------------------------------------- OLS (Table 9)

def paper_ols(t: pd.DataFrame, gain: str, winsor: Sequence[float] = (0.0, 0.01, 0.05),
              n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The three OLS models (PAPER_MODELS) on z-scored `gain` (raw, winsorized), standardized
    coefficients, R², ΔR² against "base", and coef_diff = β_L − β_I ("DL - DI") of the
    decomposition with its cluster-bootstrap CI. Rows as stats.REG_COLUMNS."""
    return ols_models(t, gain, PAPER_MODELS, winsor, n_boot, seed, diff=("decomposition", "DL", "DI"))


# ---------------------------------------------------------------- Q3 (Table 1)

Q3_COLUMNS = ["gain", "comparison", "estimate", "ci_low", "ci_high", "median", "n_q3", "n_high",
              "n_low", "n_pairs", "n_contexts", "cut_low", "cut_high", "note"]


def paper_q3(t: pd.DataFrame, gain: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Q3 = {Hn ≤ median(Hn), Dn ≥ median(Dn)} over rows with a finite gain. C is normalized again
    over the Q3 rows (Cq); low = Cq ≤ its 1/3 quantile, high = Cq ≥ its 2/3 quantile, cut-offs
    fixed, then a cluster bootstrap of mean(high) − mean(low) ("tercile"). "matched": in each
    context, Q3 positions with Cq above the context's median Cq are each paired with the nearest
    one at or below it on (Hn, Dn, pos_norm), squared Euclidean; mean (with a cluster CI) and
    median of the gain differences. Rows: Q3_COLUMNS; `note` says why a number is missing."""
    s = _finite(t, [gain, "Hn", "Dn", "Cn", "pos_norm"])
    hn, dn = s["Hn"].to_numpy(), s["Dn"].to_numpy()
    q = s[(hn <= np.median(hn)) & (dn >= np.median(dn))] if len(s) else s
    g, codes = q[gain].to_numpy(float), pd.factorize(q["context_id"])[0]
    cq = paper_norm(q["compat_mass"])
    cut_lo, cut_hi = np.quantile(cq, [1 / 3, 2 / 3]) if len(q) else (np.nan, np.nan)
    low, high = cq <= cut_lo, cq >= cut_hi
    est, ci, note, n_ctx = tercile_gap(g, high, low, codes, n_boot, seed,
                                       f"each Q3 tercile (Q3 has {len(q)} of {len(s)} positions)")
    rows = [(gain, "tercile", est, *ci, np.nan, len(q), int(high.sum()), int(low.sum()), 0, n_ctx,
             cut_lo, cut_hi, note)]
    # matching: split at each context's own median proxy
    med = pd.Series(cq).groupby(codes).transform("median").to_numpy() if len(q) else np.zeros(0)
    feats = q[["Hn", "Dn", "pos_norm"]].to_numpy(float)
    hi_idx, lo_idx, why = matched_pairs(feats, codes, cq > med, cq <= med)
    diff = g[hi_idx] - g[lo_idx]
    pc = pd.factorize(codes[hi_idx])[0]
    note = why or ci_note(len(np.unique(pc)), n_boot)
    ci = (np.nan, np.nan)
    if diff.size and not note:
        ci = percentile_ci(group_mean_draws(diff, np.ones((1, diff.size), bool), pc, n_boot, seed)[:, 0])
    rows.append((gain, "matched", diff.mean() if diff.size else np.nan, *ci,
                 np.median(diff) if diff.size else np.nan, len(q), len(np.unique(hi_idx)),
                 len(np.unique(lo_idx)), int(diff.size), len(np.unique(pc)), np.nan, np.nan, note))
    return pd.DataFrame(rows, columns=Q3_COLUMNS)


# ---------------------------------------------------------------- binned gain

def residualize(t: pd.DataFrame, gain: str, on: Sequence[str] = RESIDUALIZE_ON) -> np.ndarray:
    """gain minus its OLS fit (intercept + `on`), over t's rows (all finite)."""
    X = np.column_stack([np.ones(len(t)), t[list(on)].to_numpy(float)])
    y = t[gain].to_numpy(float)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    return y - X @ beta


def paper_bins(t: pd.DataFrame, gain: str, scores: Sequence[str] = BIN_SCORES,
               n_bins: Sequence[int] = (4, 10), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean gain (raw, and residualized on RESIDUALIZE_ON) per quartile / decile of each score, with
    cluster-bootstrap CIs. Rows: score, gain, kind (raw | residualized), n_bins, bin, n, score_min,
    score_median, score_max, gain_mean, gain_median, gain_sem, ci_low, ci_high, note."""
    s = _finite(t, [gain, *RESIDUALIZE_ON, *scores])
    codes = pd.factorize(s["context_id"])[0]
    ys = {"raw": s[gain].to_numpy(float)}
    # residuals from an OLS of 5 parameters on fewer than 5 rows are exactly 0: not a number to show
    short = too_few(len(s), len(RESIDUALIZE_ON) + 2, "residualizing on 5 parameters")
    ys["residualized"] = residualize(s, gain) if not short else np.full(len(s), np.nan)
    out = []
    for score in scores:
        x = s[score].to_numpy(float)
        for nb in n_bins:
            keys = {"bin": equal_count_bins(x, nb)}
            for kind, y in ys.items():
                b = bin_table(keys, x, y, codes, n_boot if not (kind == "residualized" and short) else 0, seed)
                if kind == "residualized" and short:
                    b["note"] = short
                out.append(b.assign(score=score, gain=gain, kind=kind, n_bins=nb))
    cols = ["score", "gain", "kind", "n_bins", "bin", "n", "score_min", "score_median", "score_max",
            "gain_mean", "gain_median", "gain_sem", "ci_low", "ci_high", "note"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


# ---------------------------------------------------------------- selection (Tables 2, 10)

def paper_selection(t: pd.DataFrame, gain: str, budgets: Sequence[float] = PAPER_BUDGETS,
                    winsor: Sequence[float] = (0.0, 0.01), n_boot: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Mean gain kept by each selector (PAPER_SELECTORS, plus "oracle" = top by the gain) keeping
    k = budget_count(N, ρ, "round") positions of the whole table (ties to the earlier position in table
    order). Selection on the raw gain's rows; mean of the kept gain raw and winsorized (winsor > 0:
    the gain clipped at its [p, 1 − p] quantiles over the table first); its cluster CI; overlap =
    |kept ∩ oracle| / k. Rows: gain, winsor, budget, selector, score, n, k, mean_gain, ci_low,
    ci_high, overlap_oracle, tied_at_cutoff, note."""
    s = table_order(_finite(t, [gain]))
    g = s[gain].to_numpy(float)
    codes = pd.factorize(s["context_id"])[0]
    n_ctx = int(codes.max()) + 1 if len(s) else 0
    cols = {**PAPER_SELECTORS, "oracle": gain}
    rows = []
    for rho in budgets:
        k = budget_count(len(s), rho, "round")
        masks = {name: select_top(s[col].to_numpy(float), k) for name, col in cols.items()}
        note = (f"too few positions (n = {len(s)}; round({rho:g} · n) = 0 kept)" if k == 0
                else ci_note(n_ctx, n_boot))
        for p in winsor:
            y = winsorize(g, p) if len(g) else g
            M = np.stack(list(masks.values())) if k else np.zeros((len(cols), len(s)), bool)
            dr = group_mean_draws(y, M, codes, n_boot, seed) if k and not note else None
            for i, (name, col) in enumerate(cols.items()):
                m = masks[name]
                ci = percentile_ci(dr[:, i]) if dr is not None else (np.nan, np.nan)
                rows.append((gain, p, rho, name, col, len(s), k, y[m].mean() if k else np.nan, *ci,
                             (m & masks["oracle"]).sum() / k if k else np.nan,
                             tied_at_cutoff(s[col].to_numpy(float), m), note))
    return pd.DataFrame(rows, columns=["gain", "winsor", "budget", "selector", "score", "n", "k",
                                       "mean_gain", "ci_low", "ci_high", "overlap_oracle",
                                       "tied_at_cutoff", "note"])
