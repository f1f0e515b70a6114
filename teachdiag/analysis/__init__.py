"""The analysis stage, from tokens.csv alone (numpy, pandas, scipy; never torch).

    from teachdiag.analysis import load_tokens, add_scores, correlations, regressions, q3_gap
    t = add_scores(load_tokens("runs/r1/tokens.csv")[0])
    correlations(t, ["rel_gain_fkl"], ["fkl", "teachability"], n_boot=1000)

Modules: stats (the teachdiag protocol), paper (the paper's protocol), bootstrap, selection,
minimum (smallest samples), instruments (agreement of runs), runs (reading tables and run
folders), plots, report / paper_report, and options (the options of `teachdiag analyze`, whose
run function is teachdiag/commands/analyze.py).

The names below are imported on first use, so importing one module of the package (options, for
`teachdiag analyze --help`) does not import scipy and seaborn through the others.
"""

_NAMES = {"add_scores": "stats", "correlations": "stats", "gain_by_bin": "stats", "q3_gap": "stats",
          "regressions": "stats", "load_run": "runs", "load_tokens": "runs"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"teachdiag.analysis.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'teachdiag.analysis' has no attribute {name!r}")
