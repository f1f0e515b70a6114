"""Options of `teachdiag analyze`, apart from the command so that `teachdiag analyze --help` reads
them without importing the statistics (scipy) and figures (matplotlib, seaborn) of commands/analyze.py.

    from teachdiag.analysis.options import AnalyzeConfig
    AnalyzeConfig(runs=["runs/r1"], protocol="paper")
"""

from __future__ import annotations

from dataclasses import dataclass, field

from teachdiag.flags import opt


@dataclass
class AnalyzeConfig:
    """Options of `teachdiag analyze` (each field's help is its --help text)."""

    runs: list[str] = field(default_factory=list, metadata={
        "positional": True, "nargs": "+",
        "help": "run folders (tokens.csv + run.json) or tokens CSV files; several are compared "
                "side by side"})
    gain: str = opt("gain column for regressions, Q3, selection and figures: gain_fkl, gain_rkl, "
                "rel_gain_fkl, rel_gain_rkl or gain_first_order (the only one of a --mode linear run); "
                "correlations cover every gain the run has", "rel_gain_fkl")
    out: str = opt("output folder (default: <first run>/analysis)", "")
    figures: str = opt("figure folder (default: <out>/figures)", "")
    bootstrap: int = opt("cluster-bootstrap resamples over contexts for every CI; 0 skips the CIs "
                "(reduce for a quick look)", 1000)
    seed: int = opt("seed of the bootstrap and the random selector", 0)
    allow_partial: bool = opt("analyze a run whose run.json says complete: false (an interrupted probe)", False)
    protocol: str = opt("teachdiag: this project's analysis (top-K entropy, union_fkl, every gain); "
                        "paper: the paper's own protocol exactly (DESIGN \"Analysis\": full-vocabulary H and "
                        "fkl, G_KLf, Tables 1, 2/10 and 9 beside the paper's numbers); needs the "
                        "response_length column", "teachdiag", choices=("teachdiag", "paper"))
    response_lengths: str = opt("contexts JSONL (id, response_ids) giving response_length = "
                                "len(response_ids) to tables written before the probe recorded it; "
                                "only right when the probe truncated nothing (max_response_tokens 0)", "")
