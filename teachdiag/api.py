"""The Python API: what a notebook calls, each a thin layer over the command of the same name.

    import teachdiag
    run = teachdiag.run_probe(teacher="T", student="S", contexts="r.jsonl", out="runs/r1", positions="200")
    run.table          # tokens.csv as a DataFrame, one row per position (README: columns)
    run.record         # run.json as a dict
    run = teachdiag.load_run("runs/r1")                     # an earlier run, no torch needed
    teachdiag.analyze("runs/r1", "runs/r2", protocol="paper")   # tables, figures, summary -> folder
    teachdiag.run_train(out="ckpt", steps=20, select="teachability")  # θτ for --student-after

Keyword arguments are the command's flags with underscores (--max-response-tokens ->
max_response_tokens); every default is the command's. Errors are the library's exceptions
(teachdiag.errors.InputError for bad input), not exit codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from teachdiag.table import RUN, TOKENS, read_tokens, row_parts


@dataclass
class Run:
    """A finished run folder: its table and its record."""

    path: Path
    table: pd.DataFrame
    record: dict


def load_run(path: str | Path, allow_partial: bool = False) -> Run:
    """tokens.csv (or .csv.gz) and run.json of a run folder, read back exactly.

    A run whose run.json says "complete": false is refused (InputError) unless allow_partial: a
    kill between writing tokens.csv and marking the run complete leaves a table that looks
    finished but was never confirmed; `--resume` finishes it. With allow_partial, a run killed
    before its table was merged gives the rows of every rank's part (tokens.partial*.csv) in file
    order, teachability and incompat normalised over the rows present (as analyze reads them)."""
    from teachdiag.errors import InputError

    path = Path(path)
    csv = next((path / n for n in (TOKENS, TOKENS + ".gz") if (path / n).is_file()), path / TOKENS)
    try:
        record = json.loads((path / RUN).read_text()) if (path / RUN).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("is not a teachdiag run record", file=str(path / RUN)) from None
    if isinstance(record, dict) and record.get("complete") is False and not allow_partial:
        raise InputError("run is incomplete (complete: false); finish it with --resume, or pass "
                         "allow_partial=True", file=str(path / RUN), field="complete")
    if not csv.is_file() and allow_partial:
        parts = [read_tokens(p) for p in row_parts(path)]
        if parts:
            from teachdiag.scores import teachability_columns  # scipy: only for a partial run

            table = pd.concat(parts, ignore_index=True)
            table["teachability"], table["incompat"] = teachability_columns(
                table["union_fkl"], table["compat_mass"], table["finite"].to_numpy() == 1)
            return Run(path, table, record)
    if not csv.is_file():
        raise InputError("no such file", file=str(csv))
    return Run(path, read_tokens(csv), record)


def run_probe(**options) -> Run:
    """`teachdiag probe` with these options; every instrument (gain="shared", student_after=...)."""
    from teachdiag.config import apply_threads
    from teachdiag.commands.probe import ProbeConfig, run_probe as _run

    options.setdefault("quiet", True)
    cfg = ProbeConfig(**options)
    apply_threads(cfg.threads)
    return load_run(_run(cfg, []))


def analyze(*runs: str | Path, **options) -> Path:
    """`teachdiag analyze RUN...`; returns the folder with the tables, figures and summary."""
    from teachdiag.commands.analyze import AnalyzeConfig, run_analyze

    return run_analyze(AnalyzeConfig(runs=[str(r) for r in runs], **options))


def run_train(**options) -> Path:
    """`teachdiag train`; returns the output folder (the model is in <out>/model)."""
    from teachdiag.config import apply_threads
    from teachdiag.commands.train import TrainConfig, run_train as _run

    options.setdefault("quiet", True)
    cfg = TrainConfig(**options)
    apply_threads(cfg.threads)
    return _run(cfg, [])


def run_viability(**options) -> pd.DataFrame:
    """`teachdiag viability`; returns viability.csv as a DataFrame (the folder is options["out"])."""
    from teachdiag.config import apply_threads
    from teachdiag.table import VIABILITY, VIABILITY_COLUMNS, VIABILITY_TEXT_COLUMNS
    from teachdiag.commands.viability import ViabilityConfig, run_viability as _run

    options.setdefault("quiet", True)
    cfg = ViabilityConfig(**options)
    apply_threads(cfg.threads)
    return read_tokens(_run(cfg, []) / VIABILITY, VIABILITY_COLUMNS, VIABILITY_TEXT_COLUMNS)


def run_calibrate(**options) -> pd.DataFrame:
    """`teachdiag calibrate`; returns the per-lr summary (calibration.json's "summary") as a DataFrame,
    beside calibration.csv and the figure in options["out"]. Raises InputError when no lr of the
    grid is in the linear regime (the files are written first)."""
    from teachdiag.config import apply_threads
    from teachdiag.commands.calibrate import CalibrateConfig, run_calibrate as _run

    options.setdefault("quiet", True)
    cfg = CalibrateConfig(**options)
    apply_threads(cfg.threads)
    out, _ = _run(cfg, [])
    return pd.DataFrame(json.loads((out / "calibration.json").read_text())["summary"])


def run_rollout(**options) -> Path:
    """`teachdiag rollout`; returns the path of the frozen contexts JSONL (options["out"])."""
    from teachdiag.config import apply_threads
    from teachdiag.commands.rollout import RolloutConfig, run_rollout as _run

    options.setdefault("quiet", True)
    cfg = RolloutConfig(**options)
    apply_threads(cfg.threads)
    return _run(cfg, [])
