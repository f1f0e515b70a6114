"""How well instruments agree: the same positions measured by two runs (per-position step, shared
step, checkpoint), their gains correlated with cluster-bootstrap CIs.

    from teachdiag.analysis.instruments import agreement
    agreement({"per_position": t1, "shared": t2, "checkpoint": t3}, gain="rel_gain_fkl", n_boot=1000)

Each pair of runs is joined on (context_id, position); only positions both measured count. A
pair with no common position gets a row with a note instead of numbers. The correlations are
stats.correlations of one run's gain with the other's, so the CIs resample contexts like every
other CI of the analysis.
"""

from __future__ import annotations

from itertools import combinations

import pandas as pd

from teachdiag.analysis.stats import correlations

KEY = ["context_id", "position"]


def agreement(tables: dict[str, pd.DataFrame], gain: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (run a, run b, method): Spearman, Pearson and Kendall of a's gain with b's gain on
    their common positions, with n, n_contexts, CI and note (stats.correlations' columns)."""
    rows = []
    for a, b in combinations(tables, 2):
        left = tables[a][[*KEY, gain]].rename(columns={gain: "a"})
        right = tables[b][[*KEY, gain]].rename(columns={gain: "b"})
        both = left.merge(right, on=KEY)
        if both.empty:
            rows.append(pd.DataFrame({"run_a": [a], "run_b": [b], "gain": [gain], "n": [0],
                                      "note": ["no position measured by both runs"]}))
            continue
        corr = correlations(both, gains=["a"], signals=["b"], n_boot=n_boot, seed=seed)
        rows.append(corr.drop(columns=["gain", "signal"]).assign(run_a=a, run_b=b, gain=gain))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    first = ["run_a", "run_b", "gain"]
    return out[first + [c for c in out.columns if c not in first]] if len(out) else out
