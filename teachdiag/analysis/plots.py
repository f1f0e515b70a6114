"""Figures of the analysis: each function takes tidy tables (with a `run` column) and returns a
matplotlib Figure; save() writes it as PNG (README) and PDF (papers); encode() gives those bytes.

    from teachdiag.analysis import plots
    fig = plots.gain_by_decile(bins, "rel_gain_fkl"); plots.save(fig, "runs/r1/analysis/figures", "gain_by_decile")

Figures are built as matplotlib.figure.Figure objects on the Agg canvas, never through pyplot's
global state, so they render headless (no display, no GUI backend) and still show in notebooks.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


def _panels(n: int, width: float = 5.0, height: float = 4.0, rows: int = 1,
            sharey: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * n, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, n, squeeze=False, sharey=sharey))
    return fig, axes


def encode(fig: Figure) -> dict[str, bytes]:
    """{".png": the figure at 150 dpi, ".pdf": the figure}, the bytes save() writes: for a caller that
    writes them through its run output (calibrate), each file whole or not at all."""
    out = {}
    for suffix, kw in ((".png", {"dpi": 150}), (".pdf", {})):
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix[1:], **kw)
        out[suffix] = buf.getvalue()
    return out


Write = Callable[[pathlib.Path, str | bytes], None]  # how a file goes to disk: a run output's write, or:


def write_plain(path: pathlib.Path, data: str | bytes) -> None:
    """`path` written as it is, text as UTF-8 (a notebook's call; `teachdiag analyze` passes its
    run output's write, each file whole or not at all)."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def save(fig: Figure, folder: str | pathlib.Path, name: str, write: Write = write_plain) -> list[pathlib.Path]:
    """Write <folder>/<name>.png (150 dpi) and .pdf; returns both paths. write: how each file's bytes
    (encode) go to disk; a command passes its run output's (each file whole or not at all)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, data in encode(fig).items():
        paths.append(folder / f"{name}{suffix}")
        write(paths[-1], data)
    return paths


def _title(ax, run: str, titles: dict[str, str] | None) -> None:
    """Title = what was measured (instrument, step rule), subtitle = the run's name."""
    desc = (titles or {}).get(run)
    ax.set_title(f"{desc}\n{run}" if desc else run, fontsize=9)


def _nothing(ax, msg: str) -> None:
    """A panel with nothing to show says why, instead of an empty frame."""
    ax.text(0.5, 0.5, msg, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _ci_bars(ax, x, lo, hi, **kw) -> None:
    """CI as vertical segments; drawn from the bounds themselves, so a point estimate outside its
    percentile interval (possible on skewed resamples) cannot make a negative error bar."""
    ok = np.isfinite(np.asarray(lo, float)) & np.isfinite(np.asarray(hi, float))
    if ok.any():
        ax.vlines(np.asarray(x, float)[ok], np.asarray(lo, float)[ok], np.asarray(hi, float)[ok], **kw)


def _log_ticks(axis) -> None:
    """Labelled ticks at 1, 2, 5 × 10^k: a log axis spanning one decade still shows several labels."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def gain_vs_fkl(tables: dict[str, pd.DataFrame], gain: str, max_points: int = 20_000,
                seed: int = 0, titles: dict[str, str] | None = None) -> Figure:
    """Scatter of gain against fkl, coloured by compat_mass; one panel per run (subsampled)."""
    fig, axes = _panels(len(tables))
    pts = None
    for ax, (run, df) in zip(axes[0], tables.items()):
        _title(ax, run, titles)
        d = df[np.isfinite(df[[gain, "fkl", "compat_mass"]].to_numpy(float)).all(1)]
        if d.empty:
            _nothing(ax, f"no positions with a finite {gain}")
            continue
        if len(d) > max_points:
            d = d.sample(max_points, random_state=seed)
        pts = ax.scatter(d["fkl"], d[gain], c=d["compat_mass"], s=4, alpha=0.5, cmap="viridis",
                         vmin=0, vmax=1, rasterized=True)
        if (d["fkl"] > 0).all() and d["fkl"].max() > 10 * d["fkl"].min():
            ax.set_xscale("log")  # fkl spans orders of magnitude
            _log_ticks(ax.xaxis)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel=FKL_LABEL, ylabel=gain_label(gain))
    if pts is not None:
        fig.colorbar(pts, ax=axes[0, -1], label="compat_mass C (teacher mass on student top-K)")
    return fig


def gain_by_decile(bins: pd.DataFrame, gain: str, titles: dict[str, str] | None = None,
                   columns: int = 4) -> Figure:
    """Small multiples: mean gain per decile of each score, with 95% cluster-bootstrap CIs; each run
    is a block of `columns`-wide rows, one panel per score, all on one y scale so panels compare at a
    glance (seven panels in a row with seven scales did not). `bins` from stats.gain_by_bin plus `run`."""
    runs, scores = list(dict.fromkeys(bins["run"])), list(dict.fromkeys(bins["score"]))
    cols = max(1, min(columns, len(scores)))
    block = max(1, -(-len(scores) // cols))  # rows per run
    fig, axes = _panels(cols, width=2.8, height=2.5, rows=block * max(1, len(runs)), sharey=True)
    if bins.empty:
        _nothing(axes[0, 0], "too few positions for deciles")
    for r, run in enumerate(runs):
        for i, score in enumerate(scores):
            ax, s = axes[r * block + i // cols, i % cols], bins[(bins["run"] == run) & (bins["score"] == score)]
            ax.set_title(f"{run}\nby {score}" if i == 0 and len(runs) > 1 else f"by {score}", fontsize=9)
            if i % cols == 0:
                ax.set_ylabel(f"mean {gain_label(gain)}", fontsize=8)
            if s.empty or not np.isfinite(s["gain_mean"]).any():
                ax.text(0.5, 0.5, "too few positions", ha="center", va="center", fontsize=9, transform=ax.transAxes)
                continue  # not _nothing: its y ticks are every panel's, shared
            ax.plot(s["bin"], s["gain_mean"], marker="o", ms=3, color="tab:blue")
            _ci_bars(ax, s["bin"], s["ci_low"], s["ci_high"], color="tab:blue", lw=1)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xticks(range(1, 11, 3))
            ax.set_xlabel("decile (1 = lowest)", fontsize=8)
        for i in range(len(scores), block * cols):  # the empty slots of the block's last row
            axes[r * block + i // cols, i % cols].set_visible(False)
    if len(runs) == 1:
        fig.suptitle(f"{(titles or {}).get(runs[0], '')}\n{runs[0]}: mean gain per decile of each "
                     "score, 95% cluster-bootstrap CI", fontsize=10)
    else:
        fig.suptitle("mean gain per decile of each score, 95% cluster-bootstrap CI", fontsize=10)
    return fig


def gain_vs_fkl_by_compat(bins: pd.DataFrame, gain: str, titles: dict[str, str] | None = None) -> Figure:
    """Mean gain per fkl bin, high vs low compat_mass (split at the median), 95% cluster CIs."""
    runs = list(dict.fromkeys(bins["run"])) or ["(no run)"]
    fig, axes = _panels(len(runs))
    for ax, run in zip(axes[0], runs):
        _title(ax, run, titles)
        d = bins[bins["run"] == run]
        if d.empty or not np.isfinite(d["gain_mean"]).any():
            _nothing(ax, "too few positions to bin")
            continue
        for (half, s), color in zip(d.groupby("half"), ("tab:orange", "tab:blue")):
            ax.plot(s["score_median"], s["gain_mean"], marker="o", ms=3, color=color,
                    label=f"{half} compat_mass")
            _ci_bars(ax, s["score_median"], s["ci_low"], s["ci_high"], color=color, lw=1)
        if (d["score_median"] > 0).all():
            ax.set_xscale("log")
            _log_ticks(ax.xaxis)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel=f"{FKL_LABEL}, bin median", ylabel=f"mean {gain_label(gain)}")
        ax.legend(fontsize=8)
    return fig


def selection_bars(sel: pd.DataFrame, gain: str, titles: dict[str, str] | None = None) -> Figure:
    """Mean gain kept by each selector at each budget; one panel per run."""
    runs = list(dict.fromkeys(sel["run"])) or ["(no run)"]
    fig, axes = _panels(len(runs), width=7)
    for ax, run in zip(axes[0], runs):
        _title(ax, run, titles)
        d = sel[(sel["run"] == run) & np.isfinite(sel["mean_gain"])]
        if d.empty:
            _nothing(ax, "no positions to select")
            continue
        d = d.assign(budget_pct=d["budget"].map("{:.0%}".format))
        # tab10 has 10 colours and there are up to 11 selectors with the oracle: Dark2 after it
        colours = (sns.color_palette("tab10") + sns.color_palette("Dark2"))[: d["selector"].nunique()]
        sns.barplot(d, x="budget_pct", y="mean_gain", hue="selector", ax=ax, palette=colours)
        ax.axhline(d["mean_gain_all"].iloc[0], color="k", ls="--", lw=0.8, label="all positions")
        ax.set(xlabel="budget (% of positions kept)", ylabel=f"mean {gain_label(gain)} kept")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return fig


def coefficients(reg: pd.DataFrame, titles: dict[str, str] | None = None) -> Figure:
    """Standardized OLS coefficients with 95% cluster-bootstrap CIs: rows = runs, cols = models,
    one colour per winsorization level. A model below its minimum sample says so."""
    c = reg[reg["stat"] == "std_coef"]
    runs, models = list(dict.fromkeys(c["run"])) or ["(no run)"], list(dict.fromkeys(c["model"])) or [""]
    fig, axes = _panels(len(models), width=4.5, height=3.2, rows=len(runs))
    levels = sorted(c["winsor"].unique())
    for r, run in enumerate(runs):
        for m, model in enumerate(models):
            ax, d = axes[r, m], c[(c["run"] == run) & (c["model"] == model)]
            desc = (titles or {}).get(run)
            ax.set_title(f"{desc}\n{run}: {model}" if desc and m == 0 else f"{run}: {model}", fontsize=9)
            if d.empty or not np.isfinite(d["estimate"]).any():
                note = d["note"].iloc[0] if len(d) and "note" in d and d["note"].iloc[0] else "no coefficients"
                _nothing(ax, note.replace("; ", ";\n"))
                continue
            terms = list(dict.fromkeys(d["term"]))
            for i, w in enumerate(levels):
                e = d[d["winsor"] == w].set_index("term").reindex(terms)
                y = np.arange(len(terms)) + (i - (len(levels) - 1) / 2) * 0.2
                pts = ax.plot(e["estimate"], y, "o", ms=3, label=f"winsor {w:.0%}")
                ok = np.isfinite(e["ci_low"].to_numpy(float))
                ax.hlines(y[ok], e["ci_low"][ok], e["ci_high"][ok], color=pts[0].get_color(), lw=1)
            ax.set_yticks(np.arange(len(terms)), terms, fontsize=8)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_xlabel("standardized coefficient (SD of gain per SD)", fontsize=8)
            if r == 0 and m == len(models) - 1:
                ax.legend(fontsize=7)
    return fig


def correlation_heatmap(corr: pd.DataFrame, method: str = "spearman",
                        titles: dict[str, str] | None = None) -> Figure:
    """Heatmap of one correlation method, signals x gains; one panel per run."""
    d = corr[(corr["method"] == method) & ~corr["signal"].str.contains(" - ")]
    runs = list(dict.fromkeys(d["run"])) or ["(no run)"]
    fig, axes = _panels(len(runs), width=5.5, height=6)
    for ax, run in zip(axes[0], runs):
        _title(ax, run, titles)
        dr = d[d["run"] == run]
        if dr.empty or not np.isfinite(dr["estimate"]).any():
            note = dr["note"].iloc[0] if len(dr) and "note" in dr and dr["note"].iloc[0] else "no correlations"
            _nothing(ax, note.replace("; ", ";\n"))
            continue
        m = dr.pivot(index="signal", columns="gain", values="estimate")
        m = _merge_identical_rows(m.loc[list(dict.fromkeys(dr["signal"]))])
        sns.heatmap(m, ax=ax, annot=True, fmt=".2f", cmap="vlag", center=0, vmin=-1, vmax=1,
                    annot_kws={"fontsize": 7}, cbar_kws={"label": f"{method} correlation"})
        ax.set(xlabel="gain", ylabel="signal")
        ax.tick_params(axis="x", labelrotation=30)
    return fig


def _merge_identical_rows(m: pd.DataFrame) -> pd.DataFrame:
    """Signals whose correlations are equal in every column (topk_entropy and the entropy selector are
    one column under two names) shown once, as "topk_entropy = entropy", rather than as repeated rows."""
    names: dict[tuple, list[str]] = {}
    for signal, row in m.iterrows():
        names.setdefault(tuple(row.to_numpy(float)), []).append(str(signal))
    keep = [group[0] for group in names.values()]
    return m.loc[keep].rename(index={group[0]: " = ".join(group) for group in names.values()})


def beta_gap(t9: pd.DataFrame, titles: dict[str, str] | None = None) -> Figure:
    """β_L vs β_I (decomposition model, raw gain) with 95% cluster-bootstrap CIs, runs side by side,
    one panel per gain; the paper's Table 9 values as open markers. t9: paper_report.table9."""
    d = t9[t9["winsor"] == 0] if len(t9) else t9
    gains = list(dict.fromkeys(d["gain"])) or ["G_KLf"]
    runs = list(dict.fromkeys(d["run"])) if len(d) else []
    fig, axes = _panels(len(gains), width=max(4.5, 1.8 * len(runs) + 2), height=4.2)
    for ax, g in zip(axes[0], gains):
        s = d[d["gain"] == g].set_index("run").reindex(runs) if runs else d
        ax.set_title("relative fkl drop G_KLf" if g == "G_KLf" else "absolute fkl drop (nats)", fontsize=9)
        if not runs or not np.isfinite(s[["beta_L", "beta_I"]].to_numpy(float)).any():
            notes = [n for n in (s["note"] if len(s) else []) if isinstance(n, str) and n]
            _nothing(ax, (notes[0] if notes else "no coefficients").replace("; ", ";\n"))
            continue
        x = np.arange(len(runs), dtype=float)
        for off, (col, label, color) in zip((-0.12, 0.12), (("beta_L", "β_L (learnable D·C)", "tab:green"),
                                                            ("beta_I", "β_I (incompatible D·(1−C))", "tab:red"))):
            ax.plot(x + off, s[col], "o", color=color, label=label)
            _ci_bars(ax, x + off, s[f"{col}_ci_low"], s[f"{col}_ci_high"], color=color, lw=1.5)
            ref = s[f"paper_{col}"].to_numpy(float)
            if np.isfinite(ref).any():
                ax.plot(x + off + 0.08, ref, "o", mfc="none", color=color, label=f"paper {label.split()[0]}")
        ax.axhline(0, color="grey", lw=0.5)
        names = [f"{r}\n{(titles or {}).get(r, '')}".replace(", ", ",\n", 1) for r in runs]
        ax.set_xticks(x, names, fontsize=7)
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_ylabel("standardized coefficient (SD of gain per SD)")
        ax.margins(y=0.15)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("decomposition model [Hn, D^L, D^I, pos_norm, Htn], raw gain", fontsize=10)
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


def viability(auc: pd.DataFrame, by_pos: pd.DataFrame, title: str = "") -> Figure:
    """Branch viability (arXiv 2605.21606): left, each predictor's AUROC for a viable branch with its
    95% cluster-bootstrap CI, one marker per label, the paper's position AUROC as a grey band;
    right, the share of viable branches by relative position. auc: analysis.viability.auroc_table
    rows (any labels); by_pos: viable_by_position rows."""
    fig, axes = _panels(2, width=5.2, height=4.2)
    ax = axes[0, 0]
    if not np.isfinite(auc["auroc"].to_numpy(float)).any():  # e.g. no viable branch at all: say why
        notes = [n for n in auc["note"] if isinstance(n, str) and n] if "note" in auc else []
        _nothing(ax, "no AUROC: " + (notes[0] if notes else "no predictor could be scored").replace("; ", ";\n"))
        ax.set_title("which signal predicts a viable teacher token", fontsize=9)
        auc = auc.iloc[:0]
    preds = list(dict.fromkeys(auc["predictor"]))
    y = np.arange(len(preds), dtype=float)
    ax.axvspan(0.66, 0.95, color="0.9", label="paper, position: 0.83 [0.66, 0.95]")
    ax.axvline(0.5, color="grey", lw=0.7)
    for off, (label, d) in zip((-0.12, 0.12), auc.groupby("label", sort=False)):
        d = d.set_index("predictor").reindex(preds)
        ax.plot(d["auroc"], y + off, "o", label=label.replace("_", " "))
        ok = np.isfinite(d["ci_low"].to_numpy(float))
        ax.hlines((y + off)[ok], d["ci_low"][ok], d["ci_high"][ok], lw=1.5, color=ax.lines[-1].get_color())
    ax.set_yticks(y, [p.replace("_", " ") for p in preds], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC for a viable branch (oriented score; 0.5 = chance)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("which signal predicts a viable teacher token", fontsize=9)
    ax = axes[0, 1]
    for i, (label, d) in enumerate(by_pos.groupby("label", sort=False)):
        mid = (d["pos_from"] + d["pos_to"]) / 2
        ax.plot(mid, d["viable_share"], "o-", label=label.replace("_", " "))
        for m, share, n in zip(mid, d["viable_share"], d["n"]):
            if np.isfinite(share) and i == 0:  # every label counts the same branches: one n per bin
                ax.annotate(f"n={n}", (m, share), fontsize=6, textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("relative position j/(T−1) of the forced token")
    ax.set_ylabel("share of branches that reach the answer")
    ax.legend(fontsize=7)
    ax.set_title("viability along the response", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def heldout_bars(means: pd.DataFrame, labels: dict[str, str], title: str = "") -> Figure:
    """Mean held-out gain per selector with 95% cluster CIs, one panel per gain (analysis/heldout.py);
    labels: gain column -> axis label with units."""
    gains = list(dict.fromkeys(means["gain"]))
    fig, axes = _panels(len(gains), width=5.0, height=3.8)
    for ax, g in zip(axes[0], gains):
        d = means[means["gain"] == g]
        x = np.arange(len(d), dtype=float)
        ax.bar(x, d["mean"], color=["tab:green" if s == "teachability" else "0.6" for s in d["selector"]])
        _ci_bars(ax, x, d["ci_low"], d["ci_high"], color="black", lw=1.5)
        ax.set_xticks(x, d["selector"], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("selector the student was trained with")
        ax.set_ylabel(labels.get(g, g))
        ax.axhline(0, color="grey", lw=0.5)
    fig.suptitle(title or "gain on held-out contexts after training with each selector at a 5% budget", fontsize=10)
    return fig
