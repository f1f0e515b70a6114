"""Minimum samples: below these a statistic writes "too few positions (n = …)" instead of a number.

    from teachdiag.analysis.minimum import too_few, ols_floor, ci_note
    note = too_few(n, ols_floor(5), "OLS with 5 terms")   # "" when n is enough
    note = note or ci_note(n_contexts, n_boot)              # "" when a CI can be drawn

Every statistic of the analysis states its floor here, once, so the tables, summary.md and the
figures agree on when a number is shown. The floors are conventions, not theorems; they are chosen
so that no printed number is an artefact of the sample size alone:
- OLS: n >= 10 · (terms + 1), the common ten-observations-per-parameter rule (intercept counted).
- Correlations: n >= 3 (two points correlate ±1 by construction).
- A mean compared with another (Q3 terciles, bins, selected sets): >= 3 rows in each group.
- A cluster-bootstrap CI: >= 2 contexts (one context resamples to the same rows every time).
- An AUROC (branch viability): >= 10 rows of each class, viable and not.
"""

from __future__ import annotations

MIN_CORR = 3
MIN_GROUP = 3
MIN_CONTEXTS_CI = 2
MIN_CLASS = 10


def ols_floor(terms: int) -> int:
    """Rows an OLS with `terms` regressors (plus an intercept) needs: 10 per parameter."""
    return 10 * (terms + 1)


def too_few(n: int, need: int, what: str) -> str:
    """'' when n >= need, else the note printed in place of the number."""
    return "" if n >= need else f"too few positions (n = {n}; {what} needs n >= {need})"


def ci_note(n_contexts: int, n_boot: int) -> str:
    """'' when a cluster-bootstrap CI can be drawn, else why not (written beside the estimate)."""
    if n_boot <= 0:
        return "no CI (--bootstrap 0)"
    if n_contexts < MIN_CONTEXTS_CI:
        return f"no CI: {n_contexts} context(s), a cluster bootstrap needs >= {MIN_CONTEXTS_CI}"
    return ""
