"""Which signals predict a viable branch: AUROC with context-clustered CIs (arXiv 2605.21606's diagnostic).

    teachdiag analyze runs/v                      # a `teachdiag viability` run folder
    from teachdiag.analysis.viability import auroc, auroc_table
    auroc(scores, labels)                         # Mann-Whitney U / (n1 n0), ties counted half
    auroc_table(df, label="viable_greedy", n_boot=1000, seed=0)

Each predictor is scored in a fixed orientation, chosen before looking at the data, so that a
higher score should mean a more reliable teacher token: position (pos_norm: later is more
reliable, the paper's oriented position score and the direction of PW-OPSD's weight) and
the PW-OPSD weight itself; lower teacher entropy, student entropy and fkl (local certainty and
agreement); higher teachability, compat_mass and the alternative's teacher and student
probability. An AUROC below 0.5 says that orientation is wrong on this data. The CI is a
percentile interval over resamples of contexts (the unit whose rows are not independent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

import teachdiag.analysis.plots as plots
from teachdiag.analysis.bootstrap import count_chunks, percentile_ci
from teachdiag.analysis.minimum import MIN_CLASS, ci_note
from teachdiag.analysis.plots import Write, write_plain
from teachdiag.analysis.report import markdown_table, run_label
from teachdiag.errors import InputError
from teachdiag.scores import position_weight
from teachdiag.table import PARTIAL, RUN, VIABILITY, VIABILITY_COLUMNS, VIABILITY_TEXT_COLUMNS, read_tokens

# (name, column, sign): AUROC of sign * column against the label
PREDICTORS = [("position", "pos_norm", 1), ("position_weight", "position_weight", 1),
              ("teacher_entropy", "teacher_entropy", -1), ("student_entropy", "student_entropy", -1),
              ("fkl", "fkl", -1), ("teachability", "teachability", 1), ("compat_mass", "compat_mass", 1),
              ("teacher_prob", "teacher_prob", 1), ("student_prob", "student_prob", 1)]
LOCAL = ("teacher_entropy", "student_entropy", "fkl")  # the paper's "local uncertainty" family
# the paper's numbers (Qwen3-4B, abstract): position 0.83 [0.66, 0.95]; local uncertainty at most 0.57
PAPER = {"position": "0.83 [0.66, 0.95]", **{k: "≤ 0.57" for k in LOCAL}}


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie): the Mann-Whitney U statistic of the
    positives divided by n_pos · n_neg, from average ranks. NaN when a class is empty."""
    score, label = np.asarray(score, float), np.asarray(label).astype(bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks: a tie adds ½ to U
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def labels_of(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The labels a run has: viable_greedy, and viable_sampled >= ½ (at least half of the samples
    reach the answer) when the run sampled continuations."""
    out = {"viable_greedy": df["viable_greedy"].to_numpy() == 1}
    if df["viable_sampled"].notna().all():
        out["viable_sampled"] = df["viable_sampled"].to_numpy() >= 0.5
    return out


def add_position_weight(df: pd.DataFrame) -> pd.DataFrame:
    """The PW-OPSD weight of each row's position (scores.position_weight, the paper's defaults)."""
    return df.assign(position_weight=position_weight(df["position"].to_numpy(), df["response_length"].to_numpy()))


def auroc_table(df: pd.DataFrame, label: str = "viable_greedy", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per predictor: AUROC of its oriented score for `label`, and a 95% CI from `n_boot`
    cluster-bootstrap resamples of contexts (the same resamples for every predictor)."""
    df = add_position_weight(df[df["finite"] == 1].reset_index(drop=True))
    y = labels_of(df)[label]
    codes, uniques = pd.factorize(df["context_id"])
    members = [np.flatnonzero(codes == c) for c in range(len(uniques))]
    # the package's resamples of contexts (bootstrap.count_chunks), as row indices: an AUROC is no moment
    draws = [np.concatenate([np.repeat(members[c], int(k)) for c, k in enumerate(row)])
             for counts in (count_chunks(codes, n_boot, seed) if n_boot > 0 and len(df) else []) for row in counts]
    no_ci = ci_note(len(uniques), n_boot)
    rows = []
    for name, column, sign in PREDICTORS:
        s = sign * df[column].to_numpy(float)
        ok = np.isfinite(s)
        n_pos, n_neg = int((y & ok).sum()), int((~y & ok).sum())
        row = {"predictor": name, "column": column, "orientation": "higher" if sign > 0 else "lower",
               "label": label, "n_rows": int(ok.sum()), "n_contexts": int(df.loc[ok, "context_id"].nunique()),
               "n_viable": n_pos, "viable_share": n_pos / max(n_pos + n_neg, 1), "auroc": float("nan"),
               "ci_low": float("nan"), "ci_high": float("nan"), "n_boot_valid": 0,
               "paper": PAPER.get(name, ""), "note": ""}
        if min(n_pos, n_neg) < MIN_CLASS:
            row["note"] = f"too few positions (viable {n_pos}, not viable {n_neg}; need {MIN_CLASS} of each)"
        else:
            row["auroc"] = auroc(s[ok], y[ok])
            if no_ci:
                row["note"] = no_ci
            else:
                boot = np.array([auroc(s[d][ok[d]], y[d][ok[d]]) for d in draws])
                row["n_boot_valid"] = int(np.isfinite(boot).sum())
                row["ci_low"], row["ci_high"] = percentile_ci(boot)
        rows.append(row)
    return pd.DataFrame(rows)


def viable_by_position(df: pd.DataFrame, label: str = "viable_greedy", bins: int = 5) -> pd.DataFrame:
    """Share of viable branches in `bins` equal-width bins of pos_norm (0 = first token, 1 = last)."""
    df = df[df["finite"] == 1]
    y = labels_of(df)[label]
    edges = np.linspace(0, 1, bins + 1)
    b = np.clip(np.digitize(df["pos_norm"].to_numpy(), edges[1:-1]), 0, bins - 1)
    out = pd.DataFrame({"bin": b, "viable": y}).groupby("bin")["viable"].agg(["mean", "size"]).reindex(range(bins))
    return pd.DataFrame({"label": label, "pos_from": edges[:-1], "pos_to": edges[1:],
                         "viable_share": out["mean"].to_numpy(), "n": out["size"].fillna(0).astype(int).to_numpy()})


def is_viability_run(path: str) -> bool:
    """A `teachdiag viability` run folder (viability.csv, or a run.json written by that command,
    finished or not), or the CSV itself."""
    p = Path(path)
    if p.name == VIABILITY or (p / VIABILITY).is_file():
        return True
    try:
        return json.loads((p / RUN).read_text()).get("command", "").split()[1:2] == ["viability"]
    except (OSError, ValueError, AttributeError):
        return False


def analyze_viability(paths: list[str], out: Path, fig_dir: Path, n_boot: int, seed: int,
                      log: Callable[[str], None], write: Write = write_plain) -> Path:
    """`teachdiag analyze` on viability runs: viability_auroc.csv, viability_by_position.csv,
    viability.md and figures/viability.png (+ .pdf), every run side by side; each file through
    `write` (the command's run output; without one, write_plain)."""
    aucs, bins, lines, folders = [], [], [], {}
    for path in paths:
        p = Path(path)
        csv, meta_path = (p / VIABILITY, p / RUN) if p.is_dir() else (p, p.parent / RUN)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("complete") is False or (p.is_dir() and not csv.is_file() and (p / PARTIAL).is_file()):
            raise InputError("run is incomplete (complete: false); finish it with teachdiag viability --resume",
                             file=str(meta_path), field="complete")
        df = read_tokens(csv, VIABILITY_COLUMNS, VIABILITY_TEXT_COLUMNS)
        folder = p.name if p.is_dir() else p.parent.name
        name = run_label(folder, meta.get("options"))
        if name in folders:  # two timestamped runs of one pair: their folders tell them apart
            name = folder if folder not in folders else str(p)
        folders[name] = folder  # figure files are named by folder, titles by run_label
        log(f"{name}: {len(df)} branches at {df.groupby(['context_id', 'position']).ngroups} positions in "
            f"{df['context_id'].nunique()} contexts; {n_boot} cluster-bootstrap resamples")
        for label in labels_of(df):
            aucs.append(auroc_table(df, label, n_boot, seed).assign(run=name, rows="all"))
            bins.append(viable_by_position(df, label).assign(run=name))
        # where the spine's prefix already states the right answer, a branch that adds no number
        # stays "viable" whatever was forced; without those rows the labels measure the branch alone
        open_rows = df[df["prefix_viable"] == 0]
        for label in labels_of(df):
            aucs.append(auroc_table(open_rows, label, n_boot, seed).assign(run=name, rows="prefix not yet right"))
        lines += _run_lines(name, df, meta)
    auc, by_pos = pd.concat(aucs, ignore_index=True), pd.concat(bins, ignore_index=True)
    auc = auc[["run", "rows", *[c for c in auc.columns if c not in ("run", "rows")]]]
    write(out / "viability_auroc.csv", auc.to_csv(index=False))
    write(out / "viability_by_position.csv", by_pos[["run", *[c for c in by_pos.columns if c != "run"]]].to_csv(index=False))
    written = []
    for name in dict.fromkeys(auc["run"]):
        fig = plots.viability(auc[(auc["run"] == name) & (auc["rows"] == "all")], by_pos[by_pos["run"] == name],
                              title=name)
        written += plots.save(fig, fig_dir, "viability" if len(paths) == 1 else f"viability_{folders[name]}", write)
    shown = auc.assign(auroc=auc["auroc"].map(lambda v: f"{v:.3f}" if np.isfinite(v) else "—"),
                       ci=[f"[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else n or "—"
                           for lo, hi, n in zip(auc["ci_low"], auc["ci_high"], auc["note"])])
    md = ["# Branch viability (arXiv 2605.21606's diagnostic)", "", *lines, "",
          "AUROC of each oriented predictor for a viable branch; 95% CI from a cluster bootstrap over contexts.", "",
          markdown_table(shown[["run", "rows", "label", "predictor", "orientation", "n_rows", "viable_share", "auroc",
                                "ci", "paper"]].assign(viable_share=shown["viable_share"].map(lambda v: f"{v:.3f}"))),
          "", *[f"![viability]({os.path.relpath(w, out)})" for w in written if w.suffix == ".png"], ""]
    write(out / "viability.md", "\n".join(md))
    log(f"wrote {out} ({len(written)} figure files in {fig_dir})")
    return out


def _run_lines(name: str, df: pd.DataFrame, meta: dict) -> list[str]:
    ctx = meta.get("contexts", {})
    solve = ctx.get("solve_rate")
    return [f"- **{name}**: {meta.get('student', {}).get('name', '?')} continuing after "
            f"{meta.get('teacher', {}).get('name', '?')}'s alternatives; rollouts solved "
            + (f"{solve:.1%} of {ctx.get('n_contexts')}" if solve is not None else "(unknown)")
            + f"; {df.groupby(['context_id', 'position']).ngroups} positions in {df['context_id'].nunique()} "
            f"contexts, {len(df)} branches; viable {df['viable_greedy'].mean():.1%} greedy"
            + (f", {df['viable_sampled'].mean():.1%} sampled" if df["viable_sampled"].notna().all() else "")]
