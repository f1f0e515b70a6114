"""`teachdiag analyze`: statistics, tables and figures from probe runs, from the CSV alone (no torch).

    teachdiag analyze runs/r1 [--gain rel_gain_fkl] [--out runs/r1/analysis] [--bootstrap 1000] [--seed 0]
    teachdiag analyze runs/sgd runs/adam --out runs/compare        # several runs, side by side
    teachdiag analyze runs/v                # a `teachdiag viability` run: AUROC per predictor (viability.py)
    python -c "from teachdiag.commands.analyze import *; run_analyze(AnalyzeConfig(runs=['runs/r1']))"

Writes to --out: correlations.csv, regressions.csv, q3.csv, selection.csv (each score's global top
ceil(ρN)), selection_ta_opd.csv (what the released TA-OPD rule keeps, batches of 8 contexts),
deciles.csv, summary.md, summary.tex, and figures/*.png + *.pdf. Every table has a `run` column.
A run is a folder holding tokens.csv (or tokens.csv.gz) and run.json, or a path to the CSV itself.
Rows whose `finite` flag is 0 are excluded from every statistic; their count is reported.

Every file goes through the run output (runfolder.RunOutput): whole or not at all, and
analysis.json, the record (command line, options, teachdiag's version, and the sha256 of every
table and run record read), says "complete": false until the last file is in place. A kill or a
full disk therefore never leaves a table that looks finished; the folder is locked while it runs,
and files an earlier analysis there wrote and this one does not are removed when it completes.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone

import pandas as pd

import teachdiag.analysis.plots as plots
import teachdiag.analysis.report as report
import teachdiag.analysis.selection as selection
import teachdiag.analysis.stats as analysis
from teachdiag.analysis.bank import bank_files, describe_bank, is_bank
from teachdiag.analysis.instruments import agreement
from teachdiag.analysis.options import AnalyzeConfig
from teachdiag.analysis.runs import CONTRASTS, DECILE_SCORES, add_response_lengths, describe, load_run
from teachdiag.analysis.trajectory import analyze_monitor, monitor_folder
from teachdiag.analysis.viability import analyze_viability, is_viability_run
from teachdiag.errors import InputError
from teachdiag.provenance import code_version, file_sha256
from teachdiag.runfolder import RunOutput, releases_locks
from teachdiag.table import RUN, TOKENS, VIABILITY, all_parts

RECORD = "analysis.json"
KEPT = ("each file written so far is whole, and analysis.json says complete: false; free space or fix "
        "permissions, then run analyze again")

# ---------------------------------------------------------------- the command

def _log(msg: str) -> None:
    print(f"teachdiag analyze: {msg}", file=sys.stderr, flush=True)


def _inputs(paths: list[str]) -> list[dict]:
    """Each given run by content: the sha256 of every table and run record analyze reads from it
    (a monitor folder: each step's tokens.csv; a token bank: its rollout files; a CSV: it and the
    run.json beside it), named relative to the folder given, or to the CSV's own folder."""
    found = []
    for path in map(pathlib.Path, paths):
        root, monitor = (path, monitor_folder(path)) if path.is_dir() else (path.parent, None)
        if monitor:
            files = sorted(monitor.glob(f"*/{TOKENS}"))
        elif path.is_dir() and is_bank(path):
            files = bank_files(path)
        elif path.is_dir():
            files = [*(path / n for n in (TOKENS, TOKENS + ".gz", VIABILITY, RUN)), *(p for p, _ in all_parts(path))]
        else:
            files = [path, path.parent / RUN]
        found.append({"path": str(path), "sha256": {str(f.relative_to(root)): file_sha256(f)
                                                    for f in files if f.is_file()}})
    return found


def _ours(name: object) -> bool:
    """Whether `name`, from an earlier analysis.json, is a file analyze could have written in --out:
    a table, summary or figure inside it (a record copied in with other runs, or edited, never makes
    analyze delete anything else)."""
    path = pathlib.PurePosixPath(str(name))
    return (isinstance(name, str) and not path.is_absolute() and ".." not in path.parts
            and path.suffix in (".csv", ".md", ".tex", ".png", ".pdf"))


class AnalysisOutput:
    """analyze's output folder: checked writable and locked when made, its record analysis.json
    written with "complete": false just before the first file (input refused before that leaves
    none) and true after the last; `write` puts one file (a table, a figure, the summary; in the
    folder or in --figures) in place whole."""

    def __init__(self, out: pathlib.Path, cfg: AnalyzeConfig, argv: list[str] | None) -> None:
        self.out, self.files = out, []
        self.output = RunOutput.rewritten(out, RECORD)
        self.output.kept = KEPT
        before = self.output.previous("--out") or {}
        self.stale = [f for f in before.get("files", []) if _ours(f)]  # an earlier analysis's files
        self.record = {"command": " ".join(["teachdiag", "analyze", *(argv or [])]), "options": asdict(cfg),
                       "teachdiag": code_version(), "inputs": _inputs(cfg.runs + ([cfg.response_lengths]
                                                                                  if cfg.response_lengths else [])),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def write(self, path: pathlib.Path, data: str | bytes) -> None:
        if not self.files:
            self.output.start(self.record)
        self.output.write(pathlib.Path(path), data)
        self.files.append(os.path.relpath(path, self.out))

    def finish(self) -> None:
        """The files an earlier analysis here wrote and this one did not are removed (whole but stale:
        they would pass for this analysis's), then the record says complete."""
        self.output.remove(*(self.out / f for f in self.stale if f not in self.files))
        self.output.finish(dict(self.record, files=self.files,
                                finished=datetime.now(timezone.utc).isoformat(timespec="seconds")))


@releases_locks
def run_analyze(cfg: AnalyzeConfig, argv: list[str] | None = None) -> pathlib.Path:
    """Run every statistic of cfg.protocol on every run of cfg.runs and write the tables, summary
    and figures through an AnalysisOutput. argv: the command line's arguments, for the record (a
    call from Python has none: its options are the record's). Returns the output folder."""
    if not cfg.runs:
        raise InputError("give at least one run folder", field="runs")
    known = (*analysis.GAINS, "gain_first_order")
    if cfg.protocol not in ("teachdiag", "paper"):
        raise InputError(f"unknown protocol {cfg.protocol!r}; choose teachdiag or paper", field="protocol")
    if cfg.protocol == "teachdiag" and cfg.gain not in known:
        raise InputError(f"unknown gain {cfg.gain!r}; choose one of {', '.join(known)}", field="gain")
    if cfg.bootstrap < 0:
        raise InputError("must be >= 0", field="bootstrap")
    first = pathlib.Path(cfg.runs[0])
    out = pathlib.Path(cfg.out) if cfg.out else (first if first.is_dir() else first.parent) / "analysis"
    fig_dir = pathlib.Path(cfg.figures) if cfg.figures else out / "figures"
    if all(monitor_folder(r) for r in cfg.runs):  # a live monitor's steps (analysis/trajectory.py)
        output = AnalysisOutput(out, cfg, argv)
        analyze_monitor(cfg.runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log, output.write)
        output.finish()
        return out
    kinds = {is_viability_run(r) for r in cfg.runs}
    if kinds == {True}:  # `teachdiag viability` runs: AUROC of each predictor (analysis/viability.py)
        for flag, value, default in (("protocol", cfg.protocol, "teachdiag"), ("gain", cfg.gain, "rel_gain_fkl"),
                                     ("allow_partial", cfg.allow_partial, False),
                                     ("response_lengths", cfg.response_lengths, "")):
            if value != default:  # refused, not ignored: a viability run has no gains or protocols
                raise InputError("does not apply to a viability run (viability.csv)", field=f"--{flag.replace('_', '-')}")
        output = AnalysisOutput(out, cfg, argv)
        analyze_viability(cfg.runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log, output.write)
        output.finish()
        return out
    if len(kinds) > 1:
        raise InputError("give either probe runs (tokens.csv) or viability runs (viability.csv), not both",
                         field="runs")
    runs = [load_run(r, cfg.allow_partial) for r in cfg.runs]
    bank = next((r for r in runs if "bank" in r), None)
    if bank is not None and cfg.protocol == "paper":  # the paper's H, D are full-vocabulary; a bank has top-K lists
        raise InputError("a TA-OPD token bank has no full-vocabulary entropy or fkl, which the paper protocol "
                         "needs; analyze it with the default protocol", file=bank["path"], field="--protocol")
    output = AnalysisOutput(out, cfg, argv)  # a read-only --out is refused now, not after every statistic
    if cfg.response_lengths:
        runs = [add_response_lengths(r, cfg.response_lengths) for r in runs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder names: fall back to the paths given
        for r in runs:
            r["name"] = r["path"]
    for r in runs:
        r["title"] = describe(r)
        if "bank" in r:
            _log(f"{r['name']}: {describe_bank(r['bank'])}")
    if cfg.protocol == "paper":
        from teachdiag.analysis.paper_command import analyze_paper  # the paper's tables

        analyze_paper(runs, out, fig_dir, cfg.bootstrap, cfg.seed, _log, output.write)
        output.finish()
        return out
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in
                                             ("corr", "reg", "q3", "sel", "ta", "dec", "split")}
    scored = {}
    for r in runs:
        t0 = time.time()
        _log(f"{r['name']}: {r['n_rows']} rows, {r['n_excluded']} excluded as non-finite, "
             f"{r['n_contexts']} contexts; {cfg.bootstrap} cluster-bootstrap resamples")
        t = analysis.add_scores(r["table"], seed=cfg.seed)
        scored[r["name"]] = t
        # measured gains, and the first-order prediction where the run has it (--mode linear: only it)
        gains = [g for g in known if t[g].notna().any()]
        signals = [s for s in analysis.SIGNALS if t[s].notna().any()]
        if cfg.gain not in gains:
            hint = "; a --mode linear run has only gain_first_order" if "gain_first_order" in gains else ""
            raise InputError(f"this run has no {cfg.gain} values{hint}", file=r["path"], field="gain")
        parts = {
            # a signal with no value at all (fkl in a token bank) would empty every row set
            "corr": analysis.correlations(t, gains, signals, cfg.bootstrap, cfg.seed,
                                          [c for c in CONTRASTS if set(c) <= set(signals)], progress=True),
            "reg": analysis.regressions(t, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed),
            "q3": analysis.q3_gap(t, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed),
            "sel": selection.selection_table(t, cfg.gain),
            "ta": selection.ta_opd_selection(t, cfg.gain, seed=cfg.seed, n_boot=cfg.bootstrap),
            "dec": pd.concat([analysis.gain_by_bin(t, s, cfg.gain, n_boot=cfg.bootstrap, seed=cfg.seed)
                              for s in DECILE_SCORES]),
            "split": analysis.gain_by_bin(t, "fkl", cfg.gain, split="compat_mass",
                                          n_boot=cfg.bootstrap, seed=cfg.seed),
        }
        for k, v in parts.items():
            tables[k].append(v.assign(run=r["name"])[["run", *v.columns]])
        _log(f"{r['name']}: statistics done in {time.time() - t0:.1f} s")
    corr, reg, q3, sel, ta, dec, split = (pd.concat(tables[k], ignore_index=True) for k in
                                          ("corr", "reg", "q3", "sel", "ta", "dec", "split"))
    for name, df in [("correlations", corr), ("regressions", reg), ("q3", q3),
                     ("selection", sel), ("selection_ta_opd", ta), ("deciles", dec)]:
        output.write(out / f"{name}.csv", df.to_csv(index=False))
    titles = {r["name"]: r["title"] for r in runs}
    figs = {
        "gain_vs_fkl": plots.gain_vs_fkl(scored, cfg.gain, seed=cfg.seed, titles=titles),
        "gain_by_decile": plots.gain_by_decile(dec, cfg.gain, titles=titles),
        "gain_vs_fkl_by_compat": plots.gain_vs_fkl_by_compat(split, cfg.gain, titles=titles),
        "selection_by_budget": plots.selection_bars(sel, cfg.gain, titles=titles),
        "std_coefficients": plots.coefficients(reg, titles=titles),
        "correlation_heatmap": plots.correlation_heatmap(corr, titles=titles),
    }
    if len(scored) > 1:  # several runs: how far their gains agree where they measured the same positions
        output.write(out / "instruments.csv", agreement(scored, cfg.gain, cfg.bootstrap, cfg.seed).to_csv(index=False))
    written = []
    for name, fig in figs.items():
        written += plots.save(fig, fig_dir, name, output.write)
    rel = [os.path.relpath(p, out) for p in written if p.suffix == ".png"]  # links work from out/
    report.write_summary(out, runs, corr, reg, q3, sel, cfg.gain, figures=rel, ta_opd=ta, write=output.write)
    output.finish()
    _log(f"wrote {out} ({len(written)} figure files in {fig_dir})")
    return out
