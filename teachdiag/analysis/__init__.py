"""The analysis stage, from tokens.csv alone (numpy, pandas, scipy; never torch).

    from teachdiag.analysis import load_tokens, add_scores, correlations, regressions, q3_gap
    t = add_scores(load_tokens("runs/r1/tokens.csv")[0])
    correlations(t, ["rel_gain_fkl"], ["fkl", "teachability"], n_boot=1000)

Modules: stats (the teachdiag protocol), paper (the paper's protocol), bootstrap, selection,
minimum (smallest samples), instruments (agreement of runs), plots, report / paper_report, and
command (`teachdiag analyze`).
"""

from teachdiag.analysis.stats import add_scores, correlations, gain_by_bin, q3_gap, regressions
from teachdiag.analysis.command import load_run, load_tokens, run_analyze

__all__ = ["add_scores", "correlations", "gain_by_bin", "q3_gap", "regressions", "load_run", "load_tokens",
           "run_analyze"]
