"""`teachdiag analyze --protocol paper`: the paper's statistics (paper.py) on every run, its tables
beside the paper's numbers (paper_report.py), one figure, and summary.md.

    teachdiag analyze runs/k8 runs/k16 runs/k32 --protocol paper --out runs/paper
    teachdiag analyze data/demo_tokens.csv.gz --protocol paper \
        --response-lengths teachdiag/demo/data/demo_rollouts.jsonl     # a table without response_length

Writes to out: paper_regressions.csv, paper_q3.csv, paper_bins.csv, paper_selection.csv (tidy, one
row per statistic, both gains G_KLf and drop_fkl, a `run` column), paper_table1.csv,
paper_table2.csv, paper_table9.csv, paper_tables.tex, summary.md, and figures/paper_betas.{png,pdf};
given several runs also instruments.csv (their agreement on G_KLf, as the default protocol writes it).
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Sequence

import pandas as pd

import teachdiag.analysis.paper as paper
import teachdiag.analysis.paper_report as paper_report
import teachdiag.analysis.plots as plots
from teachdiag.analysis.instruments import agreement
from teachdiag.analysis.plots import Write, write_plain
from teachdiag.analysis.report import markdown_table, run_line


def analyze_paper(runs: Sequence[dict], out: pathlib.Path, fig_dir: pathlib.Path, n_boot: int,
                  seed: int, log: Callable[[str], None], write: Write = write_plain) -> pathlib.Path:
    """Every statistic of the paper protocol for each run (dicts from runs.load_run), every file
    through `write` (the command's run output; without one, write_plain); returns the summary.md
    path. Raises InputError for a table without response_length."""
    parts: dict[str, list[pd.DataFrame]] = {k: [] for k in ("regressions", "q3", "bins", "selection")}
    scored = {}
    for r in runs:
        t0 = time.time()
        t = paper.paper_scores(r["table"], seed=seed, source=r["path"])
        scored[r["name"]] = t
        log(f"{r['name']}: paper protocol on {len(t)} positions, {r['n_contexts']} contexts; "
            f"{n_boot} cluster-bootstrap resamples")
        for g in paper.PAPER_GAINS:
            for k, v in {"regressions": paper.paper_ols(t, g, n_boot=n_boot, seed=seed),
                         "q3": paper.paper_q3(t, g, n_boot=n_boot, seed=seed),
                         "bins": paper.paper_bins(t, g, n_boot=n_boot, seed=seed),
                         "selection": paper.paper_selection(t, g, n_boot=n_boot, seed=seed)}.items():
                parts[k].append(v.assign(run=r["name"])[["run", *v.columns]])
        log(f"{r['name']}: paper statistics done in {time.time() - t0:.1f} s")
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    for k, v in tables.items():
        write(out / f"paper_{k}.csv", v.to_csv(index=False))
    if len(scored) > 1:  # several runs (instruments, K values): how far their gains agree, position by position
        write(out / "instruments.csv", agreement(scored, "G_KLf", n_boot, seed).to_csv(index=False))
    top_k = {r["name"]: r.get("top_k") for r in runs}
    shown = paper_report.write_paper_tables(out, tables["q3"], tables["selection"],
                                            tables["regressions"], top_k, write)
    t9 = paper_report.table9(tables["regressions"], tables["q3"], top_k)
    titles = {r["name"]: r["title"] for r in runs}
    written = plots.save(plots.beta_gap(t9, titles), fig_dir, "paper_betas", write)
    png = [p for p in written if p.suffix == ".png"][0]
    rel = os.path.relpath(png, out)  # the link works from out/, as in commands/analyze.py
    md = ["# teachdiag analysis: the paper's protocol", "", "## Data", ""]
    md += [run_line(r) for r in runs]
    md += ["", "Gains: G_KLf = (fkl − fkl_after) / (fkl + 1e-12), the paper's relative forward-KL drop; "
           "drop_fkl = fkl − fkl_after (nats). Predictors from θ0, normalized over each whole table "
           "(Norm, 0 where q95 − q05 < 1e-12). Every CI: 95% percentile interval of a cluster "
           f"bootstrap over contexts ({n_boot} resamples).", ""]
    md += paper_report.markdown_section(shown, markdown_table, several=len(runs) > 1)
    if len(scored) > 1:
        md += ["instruments.csv: Spearman, Pearson and Kendall correlation of each pair of runs' G_KLf on the "
               "positions both measured, with cluster-bootstrap CIs.", ""]
    md += ["## Figures", "", f"![β_L and β_I]({rel})", "",
           "Figure: standardized coefficients β_L (of D^L = Dn·Cn) and β_I (of D^I = Dn·(1 − Cn)) "
           "in the decomposition model, with 95% cluster-bootstrap CIs, per run and gain; the "
           "paper's 14B→1.7B values as open markers.", ""]
    write(out / "summary.md", "\n".join(md))
    log(f"wrote {out} (paper protocol; figure {png})")
    return out / "summary.md"
