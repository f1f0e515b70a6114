"""A live monitor's trajectory (integrations/monitor.py): one row per checked training step, from
that step's tokens.csv (the checkpoint gain θ0 → θ_step on a frozen bank), and its figure.

    from teachdiag.analysis.trajectory import trajectory_row, plot_trajectory, analyze_monitor
    row = trajectory_row(table, step=50)          # a step's tokens.csv as a DataFrame -> dict
    fig = plot_trajectory(pd.read_csv("runs/opd/monitor/trajectory.csv"))
    teachdiag analyze runs/opd/monitor            # analyze_monitor: every step again, with CIs

A row: step; positions (rows) and finite (rows used); the mean fkl at θ0 and at θ_step (nats);
the mean gain_fkl (nats) and rel_gain_fkl; both gains' means within the low / mid / high tercile
of teachability and of compat_mass C; and the Q3 tercile gap of both gains (H below its median, D
above it: high-C minus low-C tercile, stats.q3_gap), with its cluster-bootstrap CI when n_boot > 0.
Terciles are of average ranks over the step's finite rows (stats.terciles, q3_gap's rule).
Teachability and C are θ0's, so every step splits the same positions: the columns follow fixed
groups of tokens.
numpy/pandas/scipy only, like the rest of analysis/.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from teachdiag.analysis import plots
from teachdiag.analysis.plots import Write, write_plain
from teachdiag.analysis.stats import add_scores, q3_gap, terciles
from teachdiag.errors import InputError
from teachdiag.table import TOKENS, read_tokens

TRAJECTORY = "trajectory.csv"
GAINS = ("gain_fkl", "rel_gain_fkl")
SPLITS = ("teachability", "compat_mass")
TERCILES = ("low", "mid", "high")
COLUMNS = (["step", "positions", "finite", "fkl", "fkl_after", *GAINS]
           + [f"{g}_{s}_{t}" for g in GAINS for s in SPLITS for t in TERCILES]
           + [f"q3_{g}{x}" for g in GAINS for x in ("", "_ci_low", "_ci_high")])
STEP_DIR = re.compile(r"step_(\d+)")


def trajectory_row(table: pd.DataFrame, step: int, n_boot: int = 0, seed: int = 0) -> dict:
    """One row of the trajectory (module docstring) from a step's tokens table (all rows; those
    with finite = 0 are left out)."""
    ok = table[table["finite"] == 1]
    row: dict = {"step": int(step), "positions": len(table), "finite": len(ok),
                 "fkl": ok["fkl"].mean(), "fkl_after": ok["fkl_after"].mean()}
    for g in GAINS:
        row[g] = ok[g].mean()
    for s in SPLITS:
        groups = terciles(ok[s].to_numpy(float))
        for g in GAINS:
            values = ok[g].to_numpy(float)
            for i, t in enumerate(TERCILES):
                row[f"{g}_{s}_{t}"] = float(np.nanmean(values[groups == i])) if (groups == i).any() else math.nan
    scored = add_scores(ok, seed=seed) if len(ok) else ok
    for g in GAINS:
        q3 = q3_gap(scored, g, n_boot, seed).iloc[0] if len(ok) else {"estimate": math.nan, "ci_low": math.nan,
                                                                       "ci_high": math.nan}
        row[f"q3_{g}"], row[f"q3_{g}_ci_low"], row[f"q3_{g}_ci_high"] = q3["estimate"], q3["ci_low"], q3["ci_high"]
    return row


def plot_trajectory(traj: pd.DataFrame, gain: str = "gain_fkl"):
    """Figure: the mean `gain` by teachability tercile, by C tercile, and the Q3 gap of
    rel_gain_fkl, against the training step."""
    fig = Figure(figsize=(13.8, 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # headless, never pyplot's global state (as plots.py)
    axes = fig.subplots(1, 3)
    steps = traj["step"].to_numpy()
    for ax, split, what in ((axes[0], "teachability", "teachability D̃·C̃ at θ0"),
                            (axes[1], "compat_mass", "compat_mass C at θ0")):
        for t, color in zip(TERCILES, ("#9ecae1", "#4292c6", "#08306b")):
            ax.plot(steps, traj[f"{gain}_{split}_{t}"], marker="o", color=color, label=f"{t} tercile")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_title(f"gain by tercile of {what}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"mean {plots.gain_label(gain)}".replace("after one step", "θ0 → θ_step"))
        ax.legend(fontsize=8)
    ax = axes[2]
    q3 = "q3_rel_gain_fkl"
    ax.plot(steps, traj[q3], marker="o", color="#cb181d")
    if traj[f"{q3}_ci_low"].notna().any():
        ax.fill_between(steps, traj[f"{q3}_ci_low"], traj[f"{q3}_ci_high"], color="#cb181d", alpha=0.2,
                        label="95% cluster-bootstrap CI")
        ax.legend(fontsize=8)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_title("Q3 (H below median, D above): high-C − low-C tercile", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("difference of mean relative fkl drop (fraction of fkl)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig


def monitor_folder(path: str | pathlib.Path) -> pathlib.Path | None:
    """The monitor folder at `path`: one holding trajectory.csv, or a folder with monitor/ in it that
    is not itself a probe run (no tokens.csv)."""
    p = pathlib.Path(path)
    if (p / TRAJECTORY).is_file():
        return p
    if (p / "monitor" / TRAJECTORY).is_file() and not (p / TOKENS).exists():
        return p / "monitor"
    return None


def step_tables(folder: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(step, tokens.csv) of every finished check in a monitor folder, by step."""
    found = [(int(m.group(1)), d / TOKENS) for d in folder.iterdir()
             if (m := STEP_DIR.fullmatch(d.name)) and (d / TOKENS).is_file()]
    return sorted(found)


def analyze_monitor(paths: list[str], out: pathlib.Path, fig_dir: pathlib.Path, n_boot: int, seed: int,
                    log: Callable[[str], None], write: Write = write_plain) -> pathlib.Path:
    """`teachdiag analyze` on a monitor folder: every step's row again from its tokens.csv, now with
    cluster-bootstrap CIs (n_boot resamples): trajectory.csv, trajectory.md and figures/trajectory.png,
    each through `write` (the command's run output; without one, write_plain)."""
    if len(paths) != 1:
        raise InputError("give one monitor folder at a time", field="runs")
    folder = monitor_folder(paths[0])
    tables = step_tables(folder) if folder else []
    if not tables:
        raise InputError("no monitor step with a tokens.csv", file=str(paths[0]))
    rows = []
    for step, path in tables:
        rows.append(trajectory_row(read_tokens(path), step, n_boot, seed))
        log(f"step {step}: {rows[-1]['finite']} positions")
    traj = pd.DataFrame(rows, columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    write(out / TRAJECTORY, traj.to_csv(index=False))
    plots.save(plot_trajectory(traj), fig_dir, "trajectory", write)
    lines = [f"# Monitor trajectory: {folder}", "",
             "Checkpoint gain θ0 → θ_step on the frozen bank; gains in nats (gain_fkl) and as a share of fkl "
             f"(rel_gain_fkl); Q3 gap with a 95% cluster-bootstrap CI over contexts ({n_boot} resamples).", "",
             "| step | positions | gain_fkl | teachability low / mid / high | C low / mid / high | Q3 gap (rel) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        split = lambda s: " / ".join(f"{r[f'gain_fkl_{s}_{t}']:.4g}" for t in TERCILES)  # noqa: E731
        lines.append(f"| {r['step']} | {r['finite']} | {r['gain_fkl']:.4g} | {split('teachability')} | "
                     f"{split('compat_mass')} | {r['q3_rel_gain_fkl']:.3g} [{r['q3_rel_gain_fkl_ci_low']:.3g}, "
                     f"{r['q3_rel_gain_fkl_ci_high']:.3g}] |")
    write(out / "trajectory.md", "\n".join(lines) + "\n")
    return out
