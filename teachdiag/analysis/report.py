"""summary.md and summary.tex: one paper-ready table and the finding in three sentences, with a
verdict that says plainly when the data do NOT support the paper's claim.

    from teachdiag.analysis.report import paper_table, finding, write_summary
    write_summary("runs/r1/analysis", runs, corr, reg, q3, sel, gain="rel_gain_fkl")

The claim tested (arXiv 2605.26844): learnable disagreement (teachability = D̃·C̃) predicts the gain
better than raw fkl and than incompatible disagreement (incompat = D̃·(1−C̃)). It is "supported"
only when all three paired cluster-bootstrap CIs exclude 0 in its favour: Spearman(teachability)
− Spearman(fkl), Spearman(teachability) − Spearman(incompat), and the standardized coefficient of
teachability − that of incompat (raw gain).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from teachdiag.analysis.plots import Write, gain_label, write_plain

# (label, correlation signal, selector): the rows of the paper table
ROWS = [
    ("fkl", "fkl", "fkl"),
    ("union_fkl D", "union_fkl", "union_fkl"),
    ("entropy H", "entropy", "entropy"),
    ("TIP H+D-HD", "tip", "tip"),
    ("teach.+entropy H+T-HT", "teach_entropy", "teach_entropy"),
    ("incompat D(1-C)", "incompat", "incompat"),
    ("teachability DC", "teachability", "teachability"),
    ("random", "random", "random"),
    ("position weight w_t", None, "position"),  # a selector only: not among the correlated signals
    ("oracle (measured gain)", None, "oracle"),
]
TABLE_BUDGETS = (0.05, 0.10)
FIGURE_CAPTIONS = {  # one line under each figure in summary.md
    "gain_vs_fkl": "the gain of every position against its fkl before the step (nats, log scale), "
                   "coloured by compat_mass C.",
    "gain_by_decile": "mean gain per decile of each score, one panel per score, with 95% "
                      "cluster-bootstrap CIs over contexts.",
    "gain_vs_fkl_by_compat": "mean gain per fkl decile, positions with compat_mass above vs at or "
                             "below its median, 95% cluster-bootstrap CIs: at equal fkl, does C matter?",
    "selection_by_budget": "mean gain kept by each selector when it keeps the top ceil(rho N) "
                           "positions; dashed: mean over all positions.",
    "std_coefficients": "standardized OLS coefficients of the three models, gain raw and winsorized "
                        "at 1% and 5%, with 95% cluster-bootstrap CIs.",
    "correlation_heatmap": "Spearman correlation of each gain (columns) with each signal (rows).",
}


def _f(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def fmt_ci(row: pd.Series, spec: str = ".3f") -> str:
    """'0.123 [0.100, 0.150]'; without an estimate, the row's note (why); without a CI, why not."""
    note = row.get("note", "")
    note = note if isinstance(note, str) else ""
    if not np.isfinite(row["estimate"]):
        return f"n/a ({note})" if note else "n/a"
    if not np.isfinite(row["ci_low"]):
        return f"{_f(row['estimate'], spec)} ({note})" if note else _f(row["estimate"], spec)
    return f"{_f(row['estimate'], spec)} [{_f(row['ci_low'], spec)}, {_f(row['ci_high'], spec)}]"


def paper_table(corr: pd.DataFrame, sel: pd.DataFrame, gain: str) -> pd.DataFrame:
    """One row per (run, score): Spearman [95% CI], Kendall, mean gain kept and oracle overlap at
    5% and 10% budgets. Display strings; `corr`, `sel` carry a `run` column."""
    out = []
    for run in dict.fromkeys(sel["run"]):
        c = corr[(corr["run"] == run) & (corr["gain"] == gain)].set_index(["signal", "method"])
        s = sel[(sel["run"] == run) & (sel["gain"] == gain)].set_index(["selector", "budget"])
        for label, sig, selector in ROWS:
            has = sig and (sig, "spearman") in c.index  # a token bank has no fkl
            row = {"run": run, "score": label,
                   "Spearman [95% CI]": fmt_ci(c.loc[(sig, "spearman")]) if has else "n/a (not in this table)" if sig else "",
                   "Kendall": _f(c.loc[(sig, "kendall"), "estimate"]) if has else ""}
            for b in TABLE_BUDGETS:
                r = s.loc[(selector, b)] if (selector, b) in s.index else None
                row[f"gain kept @{b:.0%}"] = _f(r["mean_gain"], ".3g") if r is not None else ""
                row[f"oracle overlap @{b:.0%}"] = _f(r["overlap_oracle"], ".2f") if r is not None else ""
            out.append(row)
    return pd.DataFrame(out)


def _get(df: pd.DataFrame, **eq) -> pd.Series:
    m = np.ones(len(df), bool)
    for k, v in eq.items():
        m &= (df[k] == v).to_numpy()
    return df[m].iloc[0] if m.any() else pd.Series({"estimate": np.nan, "ci_low": np.nan,
                                                     "ci_high": np.nan})


def _sign(r: pd.Series) -> int:
    """+1 / -1 when the CI excludes 0 on that side, 0 otherwise."""
    return 1 if r["ci_low"] > 0 else -1 if r["ci_high"] < 0 else 0


def finding(run: str, corr: pd.DataFrame, reg: pd.DataFrame, q3: pd.DataFrame, sel: pd.DataFrame,
            gain: str) -> list[str]:
    """Three sentences with numbers, then a verdict line, for one run (tables filtered to it)."""
    c = corr[(corr["gain"] == gain) & (corr["method"] == "spearman")]
    t, f, i = (_get(c, signal=s) for s in ("teachability", "fkl", "incompat"))
    dtf, dti = _get(c, signal="teachability - fkl"), _get(c, signal="teachability - incompat")
    r0 = reg[reg["winsor"] == 0]
    bt = _get(r0, model="teachability", stat="std_coef", term="teachability")
    bi = _get(r0, model="teachability", stat="std_coef", term="incompat")
    bd = _get(r0, model="teachability", stat="coef_diff")
    dc = _get(r0, model="base+C", stat="delta_r2")
    s5 = sel[np.isclose(sel["budget"], 0.05)].set_index("selector")["mean_gain"]
    o5 = sel[np.isclose(sel["budget"], 0.05)].set_index("selector")["overlap_oracle"]
    q_t, q_m = _get(q3, comparison="tercile"), _get(q3, comparison="matched")
    n, n_ctx = int(t.get("n", 0)), int(t.get("n_contexts", 0))
    sentences = [
        f"On {run} ({n} positions, {n_ctx} contexts; gain = {gain_label(gain)}), the Spearman "
        f"correlation of teachability with the gain is {fmt_ci(t)}, against {fmt_ci(f)} for raw fkl "
        f"(difference {fmt_ci(dtf)}) and {fmt_ci(i)} for incompat (difference {fmt_ci(dti)}).",
        f"In the OLS model [H, teachability, incompat, position, teacher entropy] the standardized "
        f"coefficient of teachability is {fmt_ci(bt)} and that of incompat {fmt_ci(bi)} (difference "
        f"{fmt_ci(bd)}; the paper reports about 0.086 vs 0.044), and adding compat_mass C to the base "
        f"model [H, D, HD, position, teacher entropy] changes R² by {fmt_ci(dc, '.4f')}.",
        f"At a 5% budget, selecting by teachability keeps a mean gain of {_f(s5.get('teachability'), '.3g')} "
        f"(oracle overlap {_f(o5.get('teachability'), '.2f')}) against {_f(s5.get('fkl'), '.3g')} "
        f"for fkl, {_f(s5.get('incompat'), '.3g')} for incompat and {_f(s5.get('oracle'), '.3g')} for "
        f"the oracle; in Q3 (low H, high D) the high-C tercile gains {fmt_ci(q_t, '.3g')} more than "
        f"the low-C tercile ({fmt_ci(q_m, '.3g')} between within-context matched positions).",
    ]
    tests = {"Spearman(teachability) − Spearman(fkl) > 0": dtf,
             "Spearman(teachability) − Spearman(incompat) > 0": dti,
             "β(teachability) − β(incompat) > 0": bd}
    word = {1: "holds", -1: "does not hold (the opposite: CI excludes 0 against it)",
            0: "inconclusive (CI includes 0)"}
    lines = [f"- {name}: {fmt_ci(r)} — " + (word[_sign(r)] if np.isfinite(r["ci_low"]) else
                                          "no verdict (" + (_note(r) or "no CI") + ")")
             for name, r in tests.items()]
    signs = [_sign(r) for r in tests.values() if np.isfinite(r["ci_low"])]
    rule = ("Rule: the claim that learnable disagreement predicts the gain better than raw fkl and "
            "than incompatible disagreement is supported only when all three contrasts hold.")
    if len(signs) < len(tests):
        verdict = "no overall verdict: not every contrast has a confidence interval (see above)."
    elif all(v == 1 for v in signs):
        verdict = "these data support the claim (all three 95% CIs exclude 0 in its favour)."
    elif any(v == -1 for v in signs):
        verdict = (f"these data do NOT support the claim: {signs.count(-1)} of 3 contrasts go against "
                   f"it, {signs.count(1)} hold{'s' if signs.count(1) == 1 else ''}, "
                   f"{signs.count(0)} inconclusive.")
    else:
        verdict = (f"not established: {signs.count(1)} of 3 contrasts hold and {signs.count(0)} "
                   f"{'is' if signs.count(0) == 1 else 'are'} inconclusive; none goes against it.")
    return sentences + ["Contrasts:", *lines, rule, "Verdict: " + verdict]


def _note(r: pd.Series) -> str:
    n = r.get("note", "")
    return n if isinstance(n, str) else ""




def _tex(s: str) -> str:
    for a, b in [("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                 ("#", r"\#"), ("²", r"$^2$"), ("‖", r"$\|$"), ("≈", r"$\approx$"),
                 ("β\\_L", r"$\beta_L$"), ("β\\_I", r"$\beta_I$"), ("Δ", r"$\Delta$"), ("−", "$-$"),
                 ("→", r"$\to$"), ("≥", r"$\geq$"), ("–", "--")]:
        s = s.replace(a, b)
    return s


def to_latex(table: pd.DataFrame, caption: str, label: str = "tab:teachdiag") -> str:
    """booktabs table: runs as \\midrule-separated groups when there are several."""
    cols = [c for c in table.columns if c != "run"]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    runs = list(dict.fromkeys(table["run"]))
    for k, run in enumerate(runs):
        if len(runs) > 1:
            if k:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{_tex(run)}}}}} \\")
        for _, r in table[table["run"] == run].iterrows():
            lines.append(" & ".join(_tex(str(r[c])) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(caption)}}}",
              rf"\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# the default --out of probe and viability: runs/<date-time>, runs/viability-<date-time>
TIMESTAMP_NAME = re.compile(r"(viability-)?\d{8}-\d{6}")


def run_label(name: str, options: dict | None) -> str:
    """What tables and figures call a run: its folder's name, unless that is the default timestamp,
    which says nothing about the run; then "teacher → student" from its run.json options."""
    teacher, student = ((options or {}).get(k) for k in ("teacher", "student"))
    if not TIMESTAMP_NAME.fullmatch(name) or not (teacher and student):
        return name
    return f"{pathlib.PurePath(str(teacher)).name} → {pathlib.PurePath(str(student)).name}"


def run_line(r: dict) -> str:
    """The summary.md bullet describing one run (dict from runs.load_run)."""
    t = r.get("table")
    inst = (f", instrument = {', '.join(sorted(set(t['instrument'])))}"
            if t is not None and "instrument" in t.columns else "")
    lengths = (f", response_length from {r['response_length_from']} (len(response_ids), no truncation)"
               if r.get("response_length_from") else "")
    if r.get("bank"):  # a TA-OPD token bank (analysis/bank.py): what it has and lacks
        from teachdiag.analysis.bank import describe_bank

        lengths += f"; {describe_bank(r['bank'])}"
    return (f"- **{r['name']}** ({r['path']}): {r['n_rows']} rows, {r['n_excluded']} excluded "
            f"as non-finite, {r['n_contexts']} contexts, K = {r.get('top_k')}, "
            f"complete = {r.get('complete')}{inst}{lengths}; options: "
            + (", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "none"))


def write_summary(out: str | pathlib.Path, runs: Sequence[dict], corr: pd.DataFrame,
                  reg: pd.DataFrame, q3: pd.DataFrame, sel: pd.DataFrame, gain: str,
                  figures: Sequence[str] = (), ta_opd: pd.DataFrame | None = None,
                  write: Write = write_plain) -> tuple[pathlib.Path, pathlib.Path]:
    """Write summary.md and summary.tex into `out`. runs: dicts with name, path, n_rows,
    n_excluded, n_contexts, complete, top_k, options (from the loader); ta_opd: the
    selection_ta_opd table (selection.ta_opd_selection), shown as its own section."""
    out = pathlib.Path(out)
    table = paper_table(corr, sel, gain)
    n_boot = int(corr["n_boot"].iloc[0]) if len(corr) else 0
    caption = (f"Per-position gain ({gain}) against each score. Spearman with 95% cluster "
               f"bootstrap CI over contexts ({n_boot} resamples); mean gain kept and overlap with "
               f"the oracle set when each score keeps the top ceil(rho N) positions.")
    md = [f"# teachdiag analysis: {gain}", "", "## Data", ""]
    md += [run_line(r) for r in runs]
    md += ["", "## Table", "", markdown_table(table if len(runs) > 1 else table.drop(columns="run")),
           "", caption, "", "## Finding", ""]
    tex_text = [to_latex(table, caption)]
    for r in runs:
        keep = {k: v[v["run"] == r["name"]] for k, v in
                dict(corr=corr, reg=reg, q3=q3, sel=sel).items()}
        lines = finding(r["name"], keep["corr"], keep["reg"], keep["q3"], keep["sel"], gain)
        k = lines.index("Contrasts:")
        md += [" ".join(lines[:k]), "", "Contrasts (95% cluster-bootstrap CIs):", "", *lines[k + 1:-2],
               "", lines[-2], "", lines[-1], ""]
        tex_text.append("\n" + _tex(" ".join(lines)) + "\n")
    ties = sel[sel["tied_at_cutoff"] > sel["k"] / 2]
    if len(ties):
        md += ["Note: where a score is clipped (x̃ = 1 above its q95), its top positions tie and the "
               "tie-break (table order) picks them: " + "; ".join(
                   f"{r.run} {r.selector} at {r.budget:.0%}: {r.tied_at_cutoff} of {r.k}"
                   for r in ties.itertuples()) + ".", ""]
    if ta_opd is not None and len(ta_opd):
        md += ["## What a TA-OPD trainer keeps", "",
               f"Mean {gain} of the positions the released TA-OPD rule keeps at fixed θ0, the contexts in "
               f"batches of {int(ta_opd['batch'].iloc[0])} (selection_ta_opd.csv; `filled`: positions a context "
               "left empty adds beyond the budget, by H̃ ∨ norm(D·C)).", ""]
        for run in dict.fromkeys(ta_opd["run"]):
            t = ta_opd[ta_opd["run"] == run]
            wide = t.pivot_table(index="selector", columns="budget", values="mean_gain", sort=False)
            wide.columns = [f"{b:.0%}" for b in wide.columns]
            five = t[np.isclose(t["budget"], 0.05)].set_index("selector")
            wide["kept at 5% (filled)"] = [f"{int(five.loc[s, 'k'])} ({int(five.loc[s, 'filled'])})" for s in wide.index]
            wide = wide.reset_index().map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
            md += ([f"**{run}**", ""] if len(runs) > 1 else []) + [markdown_table(wide), ""]
    if figures:
        md += ["## Figures", ""]
        for f in figures:
            stem = pathlib.Path(f).stem
            md += [f"![{stem}]({f})", "", f"*{stem}*: {FIGURE_CAPTIONS.get(stem, '')}", ""]
    write(out / "summary.md", "\n".join(md))
    write(out / "summary.tex", "".join(tex_text))
    return out / "summary.md", out / "summary.tex"


def markdown_table(table: pd.DataFrame) -> str:
    """Pipe table without pandas' optional tabulate dependency."""
    cols = list(table.columns)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join(rows)
