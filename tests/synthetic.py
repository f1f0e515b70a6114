"""Synthetic probe tables with a planted answer, for the analysis tests and notebook development.

    from synthetic import make_tokens            # inside tests/ (pytest puts tests/ on sys.path)
    make_tokens(n_ctx=40, n_pos=50, effect="teachability").to_csv("/tmp/demo_tokens.csv.gz", index=False)

Columns follow the probe's tokens.csv contract (teachdiag.table.COLUMNS, with
`finite`) plus the optional `response_length` that --protocol paper needs.
The relative fkl gain is planted as slope · (planted score) + context effect + noise; the other
gains follow from it (gain_fkl = rel_gain_fkl · fkl, ...).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from teachdiag.analysis.stats import quantile_normalize


def make_tokens(n_ctx: int = 40, n_pos: int = 50, effect: str = "teachability", slope: float = 0.5,
                noise: float = 0.1, ctx_sd: float = 0.05, n_nonfinite: int = 0,
                seed: int = 0) -> pd.DataFrame:
    """Table of n_ctx · n_pos rows; effect: a column name whose x̃ drives rel_gain_fkl, or "none"."""
    rng = np.random.default_rng(seed)
    n = n_ctx * n_pos
    ctx = np.repeat(np.arange(n_ctx), n_pos)
    pos = np.tile(np.arange(n_pos), n_ctx)
    h = rng.beta(2, 2, n)                              # top-K entropy / log K
    d = rng.lognormal(-1.5, 1.0, n)                    # union_fkl (nats)
    c = rng.beta(4, 1.5, n)                            # teacher mass on the student's top-K
    fkl = d + (1 - c) * rng.lognormal(-1, 0.5, n)      # off-support mass adds to the full KL
    dn, cn = quantile_normalize(d), quantile_normalize(c)
    t = pd.DataFrame({
        "context_id": [f"c{i:03d}" for i in ctx], "position": pos,
        "response_length": n_pos,  # every context: positions 0 .. n_pos - 1 of a whole response
        "token_id": rng.integers(0, 512, n), "token": [f"t{i}" for i in rng.integers(0, 512, n)],
        "fkl": fkl, "rkl": fkl * rng.uniform(0.6, 1.2, n),
        "student_entropy": h * np.log(16) + rng.exponential(0.2, n),
        "teacher_entropy": rng.gamma(2.0, 0.5, n),
        "student_logprob": -rng.exponential(1.0, n), "teacher_logprob": -rng.exponential(1.0, n),
        "compat_mass": c, "topk_entropy": h, "union_fkl": d,
        "teachability": dn * cn, "incompat": dn * (1 - cn),
    })
    planted = quantile_normalize(t[effect]) if effect != "none" else np.zeros(n)
    rel = slope * planted + rng.normal(0, ctx_sd, n_ctx)[ctx] + rng.normal(0, noise, n)
    t["fkl_after"] = t["fkl"] * (1 - rel)
    rel_r = rel * rng.uniform(0.8, 1.2, n)
    t["rkl_after"] = t["rkl"] * (1 - rel_r)
    t["gain_fkl"], t["gain_rkl"] = t["fkl"] * rel, t["rkl"] * rel_r
    t["rel_gain_fkl"], t["rel_gain_rkl"] = rel, rel_r
    t["grad_norm"] = rng.lognormal(0, 0.5, n)
    t["finite"] = 1
    if n_nonfinite:
        bad = rng.choice(n, n_nonfinite, replace=False)
        t.loc[bad, "finite"] = 0
        t.loc[bad, ["fkl_after", "gain_fkl", "rel_gain_fkl"]] = np.nan
    return t
