"""Figures of the analysis: each function takes tidy tables (with a `run` column) and returns a
matplotlib Figure; save() writes it as PNG (README) and PDF (papers).

    from teachdiag.analysis import plots
    fig = plots.gain_by_decile(bins, "rel_gain_fkl"); plots.save(fig, "runs/r1/analysis/figures", "gain_by_decile")

Figures are built as matplotlib.figure.Figure objects on the Agg canvas, never through pyplot's
global state, so they render headless (no display, no GUI backend) and still show in notebooks.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

GAIN_LABELS = {
    "gain_fkl": "fkl drop after one step (nats)",
    "gain_rkl": "rkl drop after one step (nats)",
    "rel_gain_fkl": "relative fkl drop (fraction of fkl)",
    "rel_gain_rkl": "relative rkl drop (fraction of rkl)",
}
FKL_LABEL = "fkl = KL(p_T ‖ p_S) before the step (nats)"


def gain_label(gain: str) -> str:
    """Axis label with units for a gain column."""
    return GAIN_LABELS.get(gain, f"{gain} (nats)")


def _panels(n: int, width: float = 5.0, height: float = 4.0, rows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * n, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, n, squeeze=False))
    return fig, axes


def save(fig: Figure, folder: str | pathlib.Path, name: str) -> list[pathlib.Path]:
    """Write <folder>/<name>.png (150 dpi) and .pdf; returns both paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def gain_vs_fkl(tables: dict[str, pd.DataFrame], gain: str, max_points: int = 20_000,
                seed: int = 0) -> Figure:
    """Scatter of gain against fkl, coloured by compat_mass; one panel per run (subsampled)."""
    fig, axes = _panels(len(tables))
    for ax, (run, df) in zip(axes[0], tables.items()):
        d = df[np.isfinite(df[[gain, "fkl", "compat_mass"]].to_numpy(float)).all(1)]
        if len(d) > max_points:
            d = d.sample(max_points, random_state=seed)
        pts = ax.scatter(d["fkl"], d[gain], c=d["compat_mass"], s=4, alpha=0.5, cmap="viridis",
                         vmin=0, vmax=1, rasterized=True)
        if len(d) and (d["fkl"] > 0).all():
            ax.set_xscale("log")  # fkl spans orders of magnitude
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel=FKL_LABEL, ylabel=gain_label(gain), title=run)
    fig.colorbar(pts, ax=axes[0, -1], label="compat_mass C (teacher mass on student top-K)")
    return fig


def gain_by_decile(bins: pd.DataFrame, gain: str) -> Figure:
    """Mean gain (± 1.96 s.e.) per decile of each score; `bins` from gain_by_bin plus `run`."""
    runs = list(dict.fromkeys(bins["run"]))
    fig, axes = _panels(len(runs), width=6)
    for ax, run in zip(axes[0], runs):
        d = bins[bins["run"] == run]
        for score, s in d.groupby("score", sort=False):
            ax.plot(s["bin"], s["gain_mean"], marker="o", ms=3, label=score)
            ax.fill_between(s["bin"], s["gain_mean"] - 1.96 * s["gain_sem"],
                            s["gain_mean"] + 1.96 * s["gain_sem"], alpha=0.15)
        ax.set(xlabel="decile of score (1 = lowest)", ylabel=f"mean {gain_label(gain)}", title=run)
    axes[0, -1].legend(fontsize=7, title="score")
    return fig


def gain_vs_fkl_by_compat(bins: pd.DataFrame, gain: str) -> Figure:
    """Mean gain per fkl bin, high vs low compat_mass (split at the median)."""
    runs = list(dict.fromkeys(bins["run"]))
    fig, axes = _panels(len(runs))
    for ax, run in zip(axes[0], runs):
        d = bins[bins["run"] == run]
        for half, s in d.groupby("half"):
            ax.errorbar(s["score_median"], s["gain_mean"], yerr=1.96 * s["gain_sem"], marker="o",
                        ms=3, capsize=2, label=f"{half} compat_mass")
        if len(d) and (d["score_median"] > 0).all():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap within one decade
        ax.set(xlabel=f"{FKL_LABEL}, bin median", ylabel=f"mean {gain_label(gain)}", title=run)
        ax.legend(fontsize=8)
    return fig


def selection_bars(sel: pd.DataFrame, gain: str) -> Figure:
    """Mean gain kept by each selector at each budget; one panel per run."""
    runs = list(dict.fromkeys(sel["run"]))
    fig, axes = _panels(len(runs), width=7)
    for ax, run in zip(axes[0], runs):
        d = sel[sel["run"] == run].assign(budget_pct=lambda t: t["budget"].map("{:.0%}".format))
        sns.barplot(d, x="budget_pct", y="mean_gain", hue="selector", ax=ax, palette="tab10")
        ax.axhline(d["mean_gain_all"].iloc[0], color="k", ls="--", lw=0.8, label="all positions")
        ax.set(xlabel="budget (% of positions kept)", ylabel=f"mean {gain_label(gain)} kept",
               title=run)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return fig


def coefficients(reg: pd.DataFrame) -> Figure:
    """Standardized OLS coefficients with 95% cluster-bootstrap CIs: rows = runs, cols = models,
    one colour per winsorization level."""
    c = reg[reg["stat"] == "std_coef"]
    runs, models = list(dict.fromkeys(c["run"])), list(dict.fromkeys(c["model"]))
    fig, axes = _panels(len(models), width=4.5, height=3.2, rows=len(runs))
    levels = sorted(c["winsor"].unique())
    for r, run in enumerate(runs):
        for m, model in enumerate(models):
            ax, d = axes[r, m], c[(c["run"] == run) & (c["model"] == model)]
            terms = list(dict.fromkeys(d["term"]))
            for i, w in enumerate(levels):
                e = d[d["winsor"] == w].set_index("term").loc[terms]
                y = np.arange(len(terms)) + (i - (len(levels) - 1) / 2) * 0.2
                ax.errorbar(e["estimate"], y, xerr=[e["estimate"] - e["ci_low"],
                                                    e["ci_high"] - e["estimate"]],
                            fmt="o", ms=3, capsize=2, label=f"winsor {w:.0%}")
            ax.set_yticks(np.arange(len(terms)), terms, fontsize=8)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set(xlabel="standardized coefficient (SD of gain per SD)", title=f"{run}: {model}")
    axes[0, -1].legend(fontsize=7)
    return fig


def correlation_heatmap(corr: pd.DataFrame, method: str = "spearman") -> Figure:
    """Heatmap of one correlation method, signals x gains; one panel per run."""
    d = corr[(corr["method"] == method) & ~corr["signal"].str.contains(" - ")]
    runs = list(dict.fromkeys(d["run"]))
    fig, axes = _panels(len(runs), width=5.5, height=6)
    for ax, run in zip(axes[0], runs):
        m = d[d["run"] == run].pivot(index="signal", columns="gain", values="estimate")
        m = m.loc[list(dict.fromkeys(d["signal"]))]
        sns.heatmap(m, ax=ax, annot=True, fmt=".2f", cmap="vlag", center=0, vmin=-1, vmax=1,
                    annot_kws={"fontsize": 7}, cbar_kws={"label": f"{method} correlation"})
        ax.set(xlabel="gain", ylabel="signal", title=run)
        ax.tick_params(axis="x", labelrotation=30)
    return fig


def calibration(summary: pd.DataFrame, chosen: float | None, title: str,
                band: tuple[float, float] = (0.9, 1.1), max_negative: float = 0.05) -> Figure:
    """lr sweep of `teachdiag calibrate`: median measured gain / first-order prediction (IQR band,
    accepted band shaded) and % of positions whose probe loss went up, against lr; chosen lr marked."""
    fig, axes = _panels(2, width=5.5)
    ax, neg = axes[0]
    s = summary.sort_values("lr")
    ax.axhspan(*band, color="tab:green", alpha=0.15, label=f"accepted: {band[0]}–{band[1]}")
    ax.axhline(1, color="grey", lw=0.5)
    ax.fill_between(s["lr"], s["q25_ratio"], s["q75_ratio"], alpha=0.25, color="tab:blue", label="IQR over positions")
    ax.plot(s["lr"], s["median_ratio"], marker="o", ms=4, color="tab:blue", label="median")
    finite = s[["q25_ratio", "q75_ratio"]].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    lo = max(min(finite.min(initial=0.5), 0.5), -1.0)  # overshoot ratios can reach −100: clip the view
    ax.set_ylim(lo, min(max(finite.max(initial=1.5), 1.5), 3.0))
    ax.set(xscale="log", xlabel="lr (step size of the step rule, log scale)",
           ylabel="measured gain / first-order prediction lr·⟨g, d⟩ (ratio)", title="linearity")
    neg.plot(s["lr"], 100 * s["share_negative"], marker="o", ms=4, color="tab:red")
    neg.axhline(100 * max_negative, color="k", ls="--", lw=0.8, label=f"{max_negative:.0%} limit")
    neg.set(xscale="log", ylim=(-2, 102), xlabel="lr (step size of the step rule, log scale)",
            ylabel="positions whose probe loss went up (%)", title="overshoot")
    for a in (ax, neg):
        if chosen is not None:
            a.axvline(chosen, color="k", lw=1.2, label=f"chosen lr = {chosen:.3g}")
        a.legend(fontsize=7)
    fig.suptitle(title if chosen is not None else f"{title} — no lr in the linear regime", fontsize=10)
    return fig
