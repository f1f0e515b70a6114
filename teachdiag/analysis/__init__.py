"""The analysis stage, from tokens.csv alone (numpy, pandas, scipy; never torch).

    from teachdiag.analysis import load_tokens, add_scores, correlations, regressions, q3_gap
    t = add_scores(load_tokens("runs/r1/tokens.csv")[0])
    correlations(t, ["rel_gain_fkl"], ["fkl", "teachability"], n_boot=1000)

Modules: stats (the teachdiag protocol), paper (the paper's protocol), bootstrap, selection,
minimum (smallest samples), instruments (agreement of runs), plots, report / paper_report,
options (the command's options) and command (`teachdiag analyze`).

The names below are imported on first use, so importing one module of the package (options, for
`teachdiag analyze --help`) does not import scipy and seaborn through the others.
"""

_NAMES = {"add_scores": "stats", "correlations": "stats", "gain_by_bin": "stats", "q3_gap": "stats",
          "regressions": "stats", "load_run": "command", "load_tokens": "command", "run_analyze": "command"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"teachdiag.analysis.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'teachdiag.analysis' has no attribute {name!r}")
