"""Statistics of DESIGN "Analysis" on a probe table (tokens.csv), from the CSV alone (no torch).

    from teachdiag.analysis.stats import add_scores, correlations, regressions, q3_gap, gain_by_bin
    from teachdiag.analysis.command import load_tokens          # checks columns, drops finite == 0 rows
    df = add_scores(load_tokens("runs/r1/tokens.csv")[0], seed=0)
    correlations(df, gains=["rel_gain_fkl"], signals=["fkl", "teachability"], n_boot=1000)
    regressions(df, "rel_gain_fkl"); q3_gap(df, "rel_gain_fkl"); gain_by_bin(df, "fkl", "rel_gain_fkl")

Every confidence interval is a 95% percentile interval of a cluster bootstrap: contexts
(`context_id`) are drawn with replacement, because positions of one rollout are not independent.
A resample is a vector of integer row weights, so every statistic is a weighted moment (or a
weighted rank), computed for a chunk of resamples at once: 1000 resamples of 10k rows take seconds.
Kendall's tau under a resample is taken to first order (its influence function; exact for large n):
the exact version costs one O(n log n) sort per resample and pair, minutes instead of seconds.
statsmodels is not used: point OLS is one linear solve, and the clustered bootstrap of standardized
coefficients runs on batched weighted moment matrices, which statsmodels cannot batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from teachdiag.analysis.bootstrap import (context_sums, count_chunks, group_mean_draws, kendall_influence,
                                         percentile_ci, rank_groups, spearman_draws, weighted_sums)
from teachdiag.analysis.minimum import MIN_CORR, MIN_GROUP, ci_note, ols_floor, too_few
from teachdiag.scores import peer_scores, position_weight, quantile_normalize

GAINS = ("gain_fkl", "gain_rkl", "rel_gain_fkl", "rel_gain_rkl")
RAW_SIGNALS = ("fkl", "rkl", "union_fkl", "student_entropy", "teacher_entropy", "topk_entropy",
               "compat_mass", "teachability", "incompat", "position")
# Peer selection scores (DESIGN "The trainer and the selectors"), computed by add_scores.
PEER_SCORES = ("entropy", "divergence", "tip", "teach_entropy", "random")
SIGNALS = RAW_SIGNALS + PEER_SCORES
# The three OLS models of DESIGN "Analysis"; H = topk_entropy, D = union_fkl, C = compat_mass, and HD
# their raw product. Every term and the gain are z-scored, so coefficients are standardized.
HD = "topk_entropy:union_fkl"
MODELS = {
    "base": ["topk_entropy", "union_fkl", HD, "position", "teacher_entropy"],
    "base+C": ["topk_entropy", "union_fkl", HD, "position", "teacher_entropy", "compat_mass"],
    "teachability": ["topk_entropy", "teachability", "incompat", "position", "teacher_entropy"],
}
REG_COLUMNS = ["gain", "winsor", "model", "stat", "term", "estimate", "ci_low", "ci_high", "n",
               "n_contexts", "note"]


def add_scores(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Copy of `df` with the peer scores: entropy H̃, divergence D̃, tip H̃+D̃−H̃D̃,
    teach_entropy H̃+T̃−H̃T̃ (T = teachability) and random (uniform, seeded). Normalized over df's rows.
    Where the table has response lengths, also position_weight (PW-OPSD's w_t, table.py): a
    per-row number, nothing normalised."""
    out = df.copy()
    for name, score in peer_scores(out["topk_entropy"], out["union_fkl"], out["teachability"]).items():
        out[name] = score
    out["random"] = np.random.default_rng(seed).random(len(out))
    if "response_length" in out.columns and np.isfinite(out["response_length"].to_numpy(float)).any():
        out["position_weight"] = position_weight(out["position"].to_numpy(float),
                                                 out["response_length"].to_numpy(float))
    return out



# ---------------------------------------------------------------- correlations

METHODS = ("spearman", "pearson", "kendall")


def _point(x: np.ndarray, g: np.ndarray, inv: tuple | None = None,
           ranks: tuple | None = None) -> tuple[dict, np.ndarray | None]:
    """Point estimates of the three methods and Kendall's influence values (None if no tau).
    inv, ranks: (np.unique's inverse, scipy's average ranks) of x and of g, when the caller has
    them: each column is then sorted once, not once per pair."""
    if len(x) < MIN_CORR or np.ptp(x) == 0 or np.ptp(g) == 0:
        return {m: np.nan for m in METHODS}, None
    tau, psi = kendall_influence(x, g, *(inv or (None, None)))
    if ranks is None:
        rho = stats.spearmanr(x, g)[0]
    else:  # scipy.stats.spearmanr's own arithmetic: np.corrcoef of the two columns of ranks
        rho = np.corrcoef(np.column_stack(ranks), rowvar=False)[1, 0]
    return {"spearman": rho, "pearson": stats.pearsonr(x, g)[0], "kendall": tau}, psi


def _boot_block(X: np.ndarray, G: np.ndarray, codes: np.ndarray, est: dict, psi: dict,
                n_boot: int, seed: int, progress: str | None, inv: list | None = None) -> dict:
    """Bootstrap draws {(gain j, signal i, method): (n_boot,)} for signals X (n, S), gains G (n, k);
    inv: np.unique's inverse of each column of X then G, if known."""
    S, k = X.shape[1], G.shape[1]
    n = len(X)
    V = np.column_stack([X, G])
    V = V - V.mean(0)  # centre first: fewer digits lost in the moments
    VV = V * V
    pairs = [(i, j) for j in range(k) for i in range(S)]
    cross = np.column_stack([V[:, i] * V[:, S + j] for i, j in pairs])  # (n, S k)
    Psi = np.column_stack([psi[p] if psi[p] is not None else np.zeros(n) for p in pairs])
    inv = inv or [None] * (S + k)
    rx = [rank_groups(X[:, i], codes, inv[i]) for i in range(S)]
    rg = [rank_groups(G[:, j], codes, inv[S + j]) for j in range(k)]
    out = {(j, i, m): [] for i, j in pairs for m in ("pearson", "kendall")}
    mats = [V, VV, cross, Psi]
    per_context = context_sums(codes, mats)
    chunks = list(count_chunks(codes, n_boot, seed))
    rho = spearman_draws(np.concatenate(chunks), codes, rx, rg, progress)  # (n_boot, S, k)
    for counts in chunks:
        sw, (sV, sVV, sc, sPsi) = weighted_sums(counts, codes, mats, per_context)
        m1, m2, mc = sV / sw[:, None], sVV / sw[:, None], sc / sw[:, None]
        var = m2 - m1 * m1
        tau = (n / sw)[:, None] * sPsi  # first-order Kendall shift, (b, S k)
        for c, (i, j) in enumerate(pairs):
            with np.errstate(invalid="ignore", divide="ignore"):
                out[j, i, "pearson"].append((mc[:, c] - m1[:, i] * m1[:, S + j])
                                            / np.sqrt(var[:, i] * var[:, S + j]))
            kd = est[j, i]["kendall"] + tau[:, c] if psi[i, j] is not None else np.full(len(counts), np.nan)
            out[j, i, "kendall"].append(kd)
    return {**{(j, i, "spearman"): rho[:, i, j] for i, j in pairs},
            **{key: np.concatenate(v) for key, v in out.items()}}


def correlations(df: pd.DataFrame, gains: Sequence[str] = GAINS, signals: Sequence[str] = SIGNALS,
                 n_boot: int = 1000, seed: int = 0,
                 contrasts: Sequence[tuple[str, str]] = (), progress: bool = False) -> pd.DataFrame:
    """Spearman, Pearson and Kendall (tau-b) of each gain with each signal, cluster-bootstrap CIs.

    Rows used per gain: gain and every signal finite (so n is shared and contrasts are paired).
    contrasts (a, b) add rows signal="a - b": the difference of the two correlations, same resamples.
    Below minimum.MIN_CORR rows: NaN and a `note`; fewer than 2 contexts: no CI, and a note.
    Returns tidy rows: gain, signal, method, estimate, ci_low, ci_high, n, n_contexts, n_boot, note.
    """
    signals, rows = list(signals), []
    ok = {g: np.isfinite(df[[g, *signals]].to_numpy(float)).all(axis=1) for g in gains}
    blocks: dict[bytes, list[str]] = {}
    for g in gains:  # gains with the same usable rows share the signal ranks
        blocks.setdefault(ok[g].tobytes(), []).append(g)
    for block in blocks.values():
        sub = df[ok[block[0]]]
        codes = pd.factorize(sub["context_id"])[0]
        X, G = sub[signals].to_numpy(float), sub[block].to_numpy(float)
        # each column's value ranks, sorted once: the points and the bootstrap ranks share them
        cols = np.column_stack([X, G]).T
        inv = [np.unique(col, return_inverse=True)[1] for col in cols]
        ranks = [stats.rankdata(col) for col in cols]
        est, psi = {}, {}
        S = len(signals)
        for j in range(len(block)):
            for i in range(S):
                est[j, i], psi[i, j] = _point(X[:, i], G[:, j], (inv[i], inv[S + j]),
                                              (ranks[i], ranks[S + j]))
        draws = {}
        n_ctx = int(codes.max()) + 1 if len(sub) else 0
        note = too_few(len(sub), MIN_CORR, "a correlation") or ci_note(n_ctx, n_boot)
        if not note:
            draws = _boot_block(X, G, codes, est, psi, n_boot, seed,
                                f"bootstrap {','.join(block)}" if progress else None, inv)
        empty = np.array([])

        def why(*ests):  # a NaN estimate on enough rows: a constant signal or gain
            return note or ("constant over these rows" if any(np.isnan(e) for e in ests) else "")

        for j, gain in enumerate(block):
            for i, s in enumerate(signals):
                for m in METHODS:
                    rows.append((gain, s, m, est[j, i][m], *percentile_ci(draws.get((j, i, m), empty)),
                                 len(sub), n_ctx, n_boot, why(est[j, i][m])))
            for a, b in contrasts:
                ia, ib = signals.index(a), signals.index(b)
                for m in METHODS:
                    d = draws.get((j, ia, m), empty) - draws.get((j, ib, m), empty)
                    rows.append((gain, f"{a} - {b}", m, est[j, ia][m] - est[j, ib][m], *percentile_ci(d),
                                 len(sub), n_ctx, n_boot, why(est[j, ia][m], est[j, ib][m])))
    return pd.DataFrame(rows, columns=["gain", "signal", "method", "estimate", "ci_low", "ci_high",
                                       "n", "n_contexts", "n_boot", "note"])


# ---------------------------------------------------------------- OLS

def winsorize(y: np.ndarray, p: float) -> np.ndarray:
    """Clip y to its [p, 1 - p] quantiles (both tails); p = 0 returns y."""
    if p <= 0:
        return y
    lo, hi = np.quantile(y, [p, 1 - p])
    return np.clip(y, lo, hi)


def ols_std(mean: np.ndarray, second: np.ndarray, idx: list[int], iy: int):
    """Standardized coefficients (b, p) and R² (b,) from weighted moments (b, q), (b, q, q).
    Equal to OLS with an intercept on z-scored y and regressors (z-scored within each resample)."""
    cov = second - mean[:, :, None] * mean[:, None, :]
    sxx = cov[:, idx][:, :, idx]
    sxy, syy = cov[:, idx, iy], cov[:, iy, iy]
    beta = np.einsum("bij,bj->bi", np.linalg.pinv(sxx, hermitian=True), sxy)
    sdx = np.sqrt(np.clip(np.diagonal(sxx, axis1=1, axis2=2), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return beta * sdx / np.sqrt(syy)[:, None], (beta * sxy).sum(1) / syy


_ols_std = ols_std  # the name notebooks written before 0.3 may use


def _term(df: pd.DataFrame, term: str) -> np.ndarray:
    """A column, or the product of columns for an interaction written "a:b"."""
    return np.prod([df[c].to_numpy(float) for c in term.split(":")], axis=0)


def ols_models(df: pd.DataFrame, gain: str, models: dict[str, list[str]],
               winsor: Sequence[float] = (0.0, 0.01, 0.05), n_boot: int = 1000, seed: int = 0,
               diff: tuple[str, str, str] | None = None) -> pd.DataFrame:
    """OLS of `gain` on each model's terms ("a:b" = product of columns a and b), raw and winsorized.

    y and every regressor z-scored, intercept: coefficients are standardized. stat "std_coef" per
    term; "r2"; "delta_r2" = R² minus the first model's; diff = (model, a, b) adds "coef_diff" =
    coefficient of a − that of b. CIs: cluster bootstrap over contexts, the same resamples for every
    model and stat (so differences are paired). Rows with any non-finite term or gain are left out.
    Below minimum.ols_floor(terms) rows a model's rows carry NaN and a `note`; with fewer than 2
    contexts, estimates but no CI. Returns tidy rows: REG_COLUMNS.
    """
    names = list(dict.fromkeys(t for terms in models.values() for t in terms))
    cols = list(dict.fromkeys([gain, *(c for t in names for c in t.split(":"))]))
    sub = df[np.isfinite(df[cols].to_numpy(float)).all(axis=1)]
    codes = pd.factorize(sub["context_id"])[0]
    n, n_ctx = len(sub), int(codes.max()) + 1 if len(sub) else 0
    notes = {m: too_few(n, ols_floor(len(terms)), f"OLS with {len(terms)} terms")
             for m, terms in models.items()}
    first = next(iter(models))
    notes = {m: v or (notes[first] if m != first else "") for m, v in notes.items()}  # ΔR² needs it
    cinote = ci_note(n_ctx, n_boot)
    Z = np.column_stack([_term(sub, t) for t in names]) if n else np.zeros((0, len(names)))
    constant = {t for t, sd in zip(names, Z.std(0) if n else [0] * len(names)) if sd == 0}
    fitted = [m for m in models if not notes[m]]
    rows = []
    for p in winsor:
        y = winsorize(sub[gain].to_numpy(float), p) if n else np.zeros(0)
        point, boot = {}, []
        if fitted:
            V = np.column_stack([Z, y])
            V = (V - V.mean(0)) / np.where(V.std(0) > 0, V.std(0), 1.0)  # conditioning only
            q = V.shape[1]
            prods = (V[:, :, None] * V[:, None, :]).reshape(len(V), q * q)

            def fit(sw, sV, sprods):  # Σw (b,), Σw·V, Σw·prods -> {model: (coefs (b, p), r2 (b,))}
                sw = sw[:, None]
                mean, second = sV / sw, (sprods / sw).reshape(len(sw), q, q)
                return {m: ols_std(mean, second, [names.index(t) for t in models[m]], q - 1)
                        for m in fitted}

            ones = np.ones((1, n))
            point = fit(ones.sum(1), ones @ V, ones @ prods)
            if not cinote:
                per_context = context_sums(codes, [V, prods])
                boot = [fit(sw, *sums) for sw, sums in
                        (weighted_sums(c, codes, [V, prods], per_context)
                         for c in count_chunks(codes, n_boot, seed))]

        def draws(m, k, j=None):
            return np.concatenate([b[m][k][:, j] if j is not None else b[m][k] for b in boot]) \
                if boot else np.array([])

        def add(m, stat, term, est, d, note=""):
            if term in constant and not note:  # no variation: no coefficient (pinv would report 0)
                est, d, note = np.nan, np.array([]), f"{term} is constant over these rows"
            note = note or notes[m] or cinote
            rows.append((gain, p, m, stat, term, float(est), *percentile_ci(d), n, n_ctx, note))

        for m, terms in models.items():
            ok = m in point
            for j, t in enumerate(terms):
                add(m, "std_coef", t, point[m][0][0, j] if ok else np.nan,
                    draws(m, 0, j) if ok else np.array([]))
            add(m, "r2", "", point[m][1][0] if ok else np.nan, draws(m, 1) if ok else np.array([]))
            if m != first:
                add(m, "delta_r2", "", point[m][1][0] - point[first][1][0] if ok else np.nan,
                    draws(m, 1) - draws(first, 1) if ok else np.array([]))
        if diff:
            m, a, b = diff
            ok, ia, ib = m in point, models[m].index(a), models[m].index(b)
            bad = a in constant or b in constant
            add(m, "coef_diff", f"{a} - {b}",
                point[m][0][0, ia] - point[m][0][0, ib] if ok and not bad else np.nan,
                draws(m, 0, ia) - draws(m, 0, ib) if ok and not bad else np.array([]),
                "a term is constant over these rows" if ok and bad else "")
    return pd.DataFrame(rows, columns=REG_COLUMNS)


def regressions(df: pd.DataFrame, gain: str, winsor: Sequence[float] = (0.0, 0.01, 0.05),
                n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The three OLS models of DESIGN "Analysis" in teachdiag's variables (MODELS) on `gain`, raw
    and winsorized (ols_models). stat "std_coef" per term; "r2"; "delta_r2": R² minus base's R²;
    "coef_diff": teachability - incompat coefficients. A term whose column has no value at all
    (teacher_entropy in a token bank) is left out of every model. Returns tidy rows: REG_COLUMNS."""
    present = lambda term: all(df[c].notna().any() for c in term.split(":"))  # noqa: E731
    models = {name: [t for t in terms if present(t)] for name, terms in MODELS.items()}
    return ols_models(df, gain, models, winsor, n_boot, seed,
                      diff=("teachability", "teachability", "incompat"))


# ---------------------------------------------------------------- Q3 and binned gain

def matched_pairs(feats: np.ndarray, codes: np.ndarray, high: np.ndarray,
                  low: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Within-context nearest neighbours: each `high` row (bool (n,)) paired, with replacement, with
    the `low` row of its context nearest on feats (n, f), squared Euclidean; ties to the earlier
    low row (table order). Returns (high indices, low indices, why-empty ('' when pairs exist))."""
    hi_idx, lo_idx = [], []
    for c in np.unique(codes[high]):
        hi = np.flatnonzero(high & (codes == c))
        lo = np.flatnonzero(low & (codes == c))
        if lo.size:
            dist = ((feats[hi, None, :] - feats[None, lo, :]) ** 2).sum(-1)  # (hi, lo)
            hi_idx.append(hi)
            lo_idx.append(lo[dist.argmin(1)])  # argmin: ties go to the earlier low position
    if hi_idx:
        return np.concatenate(hi_idx), np.concatenate(lo_idx), ""
    per_ctx = np.bincount(codes) if len(codes) else np.zeros(0, int)
    if len(codes) == 0:
        why = "0 pairs: no positions in Q3"
    elif per_ctx.max() < 2:
        why = "0 pairs: every context has < 2 Q3 positions"
    else:
        why = "0 pairs: no context has Q3 positions on both sides (high and low) of the split"
    return np.zeros(0, int), np.zeros(0, int), why


def tercile_gap(g: np.ndarray, high: np.ndarray, low: np.ndarray, codes: np.ndarray, n_boot: int, seed: int,
                what: str) -> tuple[float, tuple[float, float], str, int]:
    """(mean(g[high]) − mean(g[low]), its cluster-bootstrap CI, note, contexts involved); the note says
    why there is no number or no CI ("too few positions ..."), '' when both are there. Both Q3 rules
    (this module's and the paper's) use it."""
    note = too_few(int(min(high.sum(), low.sum())), MIN_GROUP, what)
    n_ctx = len(np.unique(codes[high | low]))
    est, ci = np.nan, (np.nan, np.nan)
    if not note:
        est = g[high].mean() - g[low].mean()
        note = ci_note(n_ctx, n_boot)
        if not note:
            dr = group_mean_draws(g, np.stack([high, low]), codes, n_boot, seed)
            ci = percentile_ci(dr[:, 0] - dr[:, 1])
    return est, ci, note, n_ctx


def q3_gap(df: pd.DataFrame, gain: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Q3 (H below its median, D above its median): does compat_mass C matter at fixed H, D?

    "tercile": mean gain of the high-C minus the low-C tercile of Q3 (terciles of average ranks,
    so tied C values stay together). "matched": each high-C Q3 position is paired, with replacement,
    with the nearest low-C Q3 position of the same context on (H̃, D̃, position normalized like x̃);
    mean of the paired gain differences. CIs: cluster bootstrap over contexts. `df` from add_scores.
    Each tercile needs minimum.MIN_GROUP rows, else NaN and a `note` says why (so does 0 pairs).
    Returns rows: gain, comparison, estimate, ci_low, ci_high, mean_high, mean_low, n_high, n_low,
    n_pairs, n_contexts, note.
    """
    pos = quantile_normalize(df["position"])  # over the run's rows, like H̃ and D̃
    keep = np.isfinite(df[[gain, "topk_entropy", "union_fkl", "compat_mass"]].to_numpy(float)).all(1)
    sub, pos = df[keep], pos[keep]
    h, d = sub["topk_entropy"].to_numpy(float), sub["union_fkl"].to_numpy(float)
    in_q3 = (h < np.median(h)) & (d > np.median(d)) if len(sub) else np.zeros(0, bool)
    q = sub[in_q3]
    g, codes = q[gain].to_numpy(float), pd.factorize(q["context_id"])[0]
    r = stats.rankdata(q["compat_mass"]) if len(q) else np.zeros(0)
    low, high = r <= len(q) / 3, r > 2 * len(q) / 3
    rows = []
    est, ci, note, n_ctx = tercile_gap(g, high, low, codes, n_boot, seed,
                                       f"each Q3 tercile (Q3 has {len(q)} of {len(sub)} positions)")
    rows.append((gain, "tercile", est, *ci, g[high].mean() if high.any() else np.nan,
                 g[low].mean() if low.any() else np.nan, int(high.sum()), int(low.sum()),
                 0, n_ctx, note))
    # within-context nearest neighbour on (H̃, D̃, position~)
    feats = np.column_stack([q["entropy"], q["divergence"], pos[in_q3]]) if len(q) else np.zeros((0, 3))
    hi_idx, lo_idx, why = matched_pairs(feats, codes, high, low)
    diff = g[hi_idx] - g[lo_idx]
    est, ci = (diff.mean() if diff.size else np.nan), (np.nan, np.nan)
    pc = pd.factorize(codes[hi_idx])[0]
    note = why or ci_note(len(np.unique(pc)), n_boot)
    if diff.size and not note:
        ci = percentile_ci(group_mean_draws(diff, np.ones((1, diff.size), bool), pc, n_boot, seed)[:, 0])
    rows.append((gain, "matched", est, *ci,
                 g[hi_idx].mean() if diff.size else np.nan, g[lo_idx].mean() if diff.size else np.nan,
                 len(np.unique(hi_idx)), len(np.unique(lo_idx)), int(diff.size),
                 len(np.unique(codes[hi_idx])), note))
    return pd.DataFrame(rows, columns=["gain", "comparison", "estimate", "ci_low", "ci_high",
                                       "mean_high", "mean_low", "n_high", "n_low", "n_pairs",
                                       "n_contexts", "note"])


def equal_count_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin 1..n_bins of each value of x (n,) by rank, equal counts; ties split in table order."""
    rank = stats.rankdata(x, method="ordinal") if len(x) else np.zeros(0, int)
    return (rank - 1) * n_bins // max(1, len(x)) + 1


def bin_table(keys: dict[str, np.ndarray], s: np.ndarray, g: np.ndarray, codes: np.ndarray,
              n_boot: int, seed: int) -> pd.DataFrame:
    """Per group of `keys` (columns of equal length): n, score min/median/max, gain mean/median/sem
    and a cluster-bootstrap CI of the mean gain (ci_low, ci_high) with its `note`."""
    t = pd.DataFrame({**keys, "s": s, "g": g})
    out = t.groupby(list(keys), sort=True).agg(
        n=("g", "size"), score_min=("s", "min"), score_median=("s", "median"),
        score_max=("s", "max"), gain_mean=("g", "mean"), gain_median=("g", "median"),
        gain_sem=("g", "sem")).reset_index()
    member = np.stack([np.all([t[k].to_numpy() == v for k, v in zip(keys, r)], axis=0)
                       for r in out[list(keys)].itertuples(index=False)]) if len(out) else np.zeros((0, len(t)))
    n_ctx = int(codes.max()) + 1 if len(codes) else 0
    cinote = ci_note(n_ctx, n_boot)
    dr = group_mean_draws(g, member, codes, n_boot, seed) if not cinote and len(out) else None
    cis = [percentile_ci(dr[:, i]) if dr is not None else (np.nan, np.nan) for i in range(len(out))]
    out["ci_low"], out["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    out["note"] = [too_few(int(k), MIN_GROUP, "a bin's mean") or cinote for k in out["n"]]
    return out


def gain_by_bin(df: pd.DataFrame, score: str, gain: str, n_bins: int = 10,
                split: str | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Gain per equal-count bin of `score` (bin 1 = lowest; tied scores are split in table order
    so bins have equal size). `split`: a column cut at its median into half "high" (> median) and
    "low"; the score bins stay common to both halves, so halves compare at equal score.
    ci_low/ci_high: 95% cluster-bootstrap CI of the bin's mean gain (contexts resampled, bin
    membership fixed); a bin of fewer than minimum.MIN_GROUP rows carries a note.
    Returns rows: score, gain, [half], bin, n, score_min, score_median, score_max, gain_mean,
    gain_median, gain_sem, ci_low, ci_high, note.
    """
    cols = [score, gain] + ([split] if split else [])
    sub = df[np.isfinite(df[cols].to_numpy(float)).all(axis=1)]
    keys = {"bin": equal_count_bins(sub[score].to_numpy(float), n_bins)}
    if split:
        s = sub[split].to_numpy(float)
        keys = {"half": np.where(s > np.median(s), "high", "low"), **keys}
    out = bin_table(keys, sub[score].to_numpy(float), sub[gain].to_numpy(float),
                    pd.factorize(sub["context_id"])[0], n_boot, seed)
    out.insert(0, "gain", gain)
    out.insert(0, "score", score)
    return out
