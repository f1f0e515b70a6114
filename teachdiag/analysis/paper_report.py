"""The paper protocol's outputs laid out like the paper's Tables 1, 2/10 and 9, ours beside theirs.

    from teachdiag.analysis.paper_report import table1, table2, table9, write_paper_tables
    write_paper_tables("runs/r1/analysis", runs, q3, sel, reg)   # paper_table{1,2,9}.csv + paper_tables.tex

Each row holds our number (with its 95% cluster-bootstrap CI) and, where the paper gives one, the
paper's own number (PAPER, copied from the paper's Tables 1, 2, 9 and 10). The paper's numbers are for checkpoint gains of
Qwen3 pairs (14B→1.7B unless the setting says otherwise) and the relative gain G_KLf; they are
shown beside the G_KLf rows only, at the run's K (K = 16 when the run's K is not 8, 16 or 32).
"""

from __future__ import annotations

import pathlib
import numpy as np
import pandas as pd

from teachdiag.analysis.plots import Write, write_plain
from teachdiag.analysis.report import to_latex

# The paper's numbers (arXiv 2605.26844), copied from the design brief's "The paper's numbers to hold a
# reproduction against" (checkpoint gain, G_KLf). NaN: the paper gives no such number.
PAPER = {
    # Table 9, 14B→1.7B: K -> (β_L, β_I, gap, gap CI low, gap CI high, ΔR²)
    "table9": {8: (0.086, 0.045, 0.041, 0.039, 0.044, 0.90e-3),
               16: (0.087, 0.043, 0.044, 0.041, 0.047, 0.79e-3),
               32: (0.087, 0.043, 0.044, 0.041, 0.047, 0.74e-3)},
    "q3_positions": 2393,  # Table 9's Q3 size
    # Table 1: setting -> (Q3 high−low gap, CI low, CI high, matched gap)
    "table1": {"4B→1.7B held-out": (0.078, 0.060, 0.095, 0.016),
               "4B→1.7B GSM8K": (0.087, 0.066, 0.109, 0.037),
               "8B→1.7B": (0.118, 0.094, 0.144, 0.042),
               "14B→1.7B K=8": (0.098, np.nan, np.nan, 0.071),
               "14B→1.7B K=16": (0.084, np.nan, np.nan, 0.058),
               "14B→1.7B K=32": (0.078, np.nan, np.nan, 0.046)},
    # Table 2 (3%, 5%) and Table 10 (teachability at 1, 3, 5, 10%): selector -> {budget: gain kept}
    "table2": {"teachability": {0.01: 0.034, 0.03: 0.047, 0.05: 0.049, 0.10: 0.035},
               "raw KL": {0.03: 0.033, 0.05: 0.036}, "TIP": {0.03: 0.023, 0.05: 0.026},
               "random": {0.03: 0.021, 0.05: 0.021}, "entropy": {0.03: 0.018, 0.05: 0.009}},
}


def _k(top_k) -> int:
    return top_k if top_k in PAPER["table9"] else 16


def _ours(r: pd.Series) -> dict:
    return {"estimate": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "note": r["note"]}


def table1(q3: pd.DataFrame, top_k: dict[str, int | None]) -> pd.DataFrame:
    """One row per (run, gain): Q3 gap [CI], matched gap (mean, median, pairs), paper beside."""
    rows = []
    for (run, gain), d in q3.groupby(["run", "gain"], sort=False):
        t, m = d.set_index("comparison").loc["tercile"], d.set_index("comparison").loc["matched"]
        setting = f"14B→1.7B K={_k(top_k.get(run))}"
        ref = PAPER["table1"][setting] if gain == "G_KLf" else (np.nan,) * 4
        rows.append({"run": run, "gain": gain, "n_q3": int(t["n_q3"]), "n_high": int(t["n_high"]),
                     "n_low": int(t["n_low"]), "gap": t["estimate"], "ci_low": t["ci_low"],
                     "ci_high": t["ci_high"], "gap_note": t["note"], "matched_gap": m["estimate"],
                     "matched_ci_low": m["ci_low"], "matched_ci_high": m["ci_high"],
                     "matched_median": m["median"], "n_pairs": int(m["n_pairs"]),
                     "matched_note": m["note"], "paper_setting": setting if gain == "G_KLf" else "",
                     "paper_gap": ref[0], "paper_ci_low": ref[1], "paper_ci_high": ref[2],
                     "paper_matched_gap": ref[3]})
    return pd.DataFrame(rows)


def table2(sel: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, gain, winsor, selector, budget): mean gain kept [CI], oracle overlap,
    paper's number beside (G_KLf, raw gain only)."""
    s = sel.copy()
    ref = [PAPER["table2"].get(r.selector, {}).get(round(r.budget, 4), np.nan)
           if r.gain == "G_KLf" and r.winsor == 0 else np.nan for r in s.itertuples()]
    return s.assign(paper_mean_gain=ref)[["run", "gain", "winsor", "budget", "selector", "n", "k",
                                          "mean_gain", "ci_low", "ci_high", "overlap_oracle",
                                          "tied_at_cutoff", "note", "paper_mean_gain"]]


def table9(reg: pd.DataFrame, q3: pd.DataFrame, top_k: dict[str, int | None]) -> pd.DataFrame:
    """One row per (run, gain, winsor): β_L, β_I (decomposition model), gap β_L − β_I [CI], ΔR² of
    the decomposition over the base model, n, Q3 size; the paper's Table 9 row at the run's K."""
    rows = []
    for (run, gain, w), d in reg.groupby(["run", "gain", "winsor"], sort=False):
        dec = d[d["model"] == "decomposition"]

        def get(stat, term=""):
            r = dec[(dec["stat"] == stat) & (dec["term"] == term)]
            return r.iloc[0] if len(r) else pd.Series({"estimate": np.nan, "ci_low": np.nan,
                                                        "ci_high": np.nan, "note": "not computed"})
        bl, bi, gap, dr2 = get("std_coef", "DL"), get("std_coef", "DI"), get("coef_diff", "DL - DI"), get("delta_r2")
        k = _k(top_k.get(run))
        ref = PAPER["table9"][k] if gain == "G_KLf" and w == 0 else (np.nan,) * 6
        q = q3[(q3["run"] == run) & (q3["gain"] == gain) & (q3["comparison"] == "tercile")]
        rows.append({"run": run, "gain": gain, "winsor": w, "n": int(dec["n"].iloc[0]) if len(dec) else 0,
                     "n_q3": int(q["n_q3"].iloc[0]) if len(q) else 0,
                     "beta_L": bl["estimate"], "beta_L_ci_low": bl["ci_low"], "beta_L_ci_high": bl["ci_high"],
                     "beta_I": bi["estimate"], "beta_I_ci_low": bi["ci_low"], "beta_I_ci_high": bi["ci_high"],
                     "gap": gap["estimate"], "ci_low": gap["ci_low"], "ci_high": gap["ci_high"],
                     "delta_r2": dr2["estimate"], "note": gap["note"],
                     "paper_K": k if gain == "G_KLf" and w == 0 else np.nan,
                     "paper_beta_L": ref[0], "paper_beta_I": ref[1], "paper_gap": ref[2],
                     "paper_ci_low": ref[3], "paper_ci_high": ref[4], "paper_delta_r2": ref[5],
                     "paper_n_q3": PAPER["q3_positions"] if gain == "G_KLf" and w == 0 else np.nan})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- display

def f3(x: float, spec: str = "+.3f") -> str:
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def with_ci(est: float, lo: float, hi: float, note: str = "", spec: str = "+.3f") -> str:
    """'+0.084 [+0.041, +0.047]'; the note when there is no estimate; no brackets without a CI."""
    if not np.isfinite(est):
        return note if isinstance(note, str) and note else "–"
    return f3(est, spec) + (f" [{f3(lo, spec)}, {f3(hi, spec)}]" if np.isfinite(lo) else "")


def display_tables(t1: pd.DataFrame, t2: pd.DataFrame, t9: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Display strings (G_KLf first, then drop_fkl) for summary.md and LaTeX: run column kept."""
    d1 = pd.DataFrame({
        "run": t1["run"], "gain": t1["gain"], "Q3 n": t1["n_q3"],
        "high − low C [95% CI]": [with_ci(r.gap, r.ci_low, r.ci_high, r.gap_note) for r in t1.itertuples()],
        "matched (pairs)": [with_ci(r.matched_gap, np.nan, np.nan, r.matched_note) + f" ({r.n_pairs})"
                            for r in t1.itertuples()],
        "paper gap [CI]": [with_ci(r.paper_gap, r.paper_ci_low, r.paper_ci_high) for r in t1.itertuples()],
        "paper matched": [f3(x) for x in t1["paper_matched_gap"]],
        "paper setting": t1["paper_setting"]})
    raw = t2[t2["winsor"] == 0]
    wide = []
    for (run, gain, sel), d in raw.groupby(["run", "gain", "selector"], sort=False):
        row = {"run": run, "gain": gain, "selector": sel}
        for r in d.itertuples():
            row[f"{r.budget:.0%}"] = with_ci(r.mean_gain, r.ci_low, r.ci_high, r.note, ".3f")
            row[f"paper {r.budget:.0%}"] = f3(r.paper_mean_gain, ".3f")
        wide.append(row)
    d2 = pd.DataFrame(wide)
    d9 = pd.DataFrame({
        "run": t9["run"], "gain": t9["gain"], "winsor": [f"{w:.0%}" for w in t9["winsor"]],
        "β_L": [f3(x) for x in t9["beta_L"]], "β_I": [f3(x) for x in t9["beta_I"]],
        "β_L − β_I [95% CI]": [with_ci(r.gap, r.ci_low, r.ci_high, r.note) for r in t9.itertuples()],
        "ΔR²": [f3(x, ".2e") for x in t9["delta_r2"]],
        "paper β_L / β_I": [f"{f3(a)} / {f3(b)}" if np.isfinite(a) else "–"
                           for a, b in zip(t9["paper_beta_L"], t9["paper_beta_I"])],
        "paper gap [CI]": [with_ci(r.paper_gap, r.paper_ci_low, r.paper_ci_high) for r in t9.itertuples()],
        "paper ΔR²": [f3(x, ".2e") for x in t9["paper_delta_r2"]]})
    return {"table1": d1, "table2": d2, "table9": d9}


CAPTIONS = {
    "table1": "Q3 (Hn <= median, Dn >= median): mean gain of the high-C minus the low-C tercile "
              "(C renormalized inside Q3), 95% cluster-bootstrap CI over contexts; matched: "
              "within-context nearest-neighbour pairs on (Hn, Dn, pos_norm), mean difference.",
    "table2": "Mean gain kept when each selector keeps the top round(rho N) positions of the whole "
              "table (95% cluster-bootstrap CI); the paper's Tables 2 and 10 beside.",
    "table9": "Standardized OLS coefficients of D^L = Dn Cn and D^I = Dn (1 - Cn) in [Hn, D^L, D^I, "
              "pos_norm, Htn] (y and regressors z-scored), beta_L - beta_I with its 95% "
              "cluster-bootstrap CI, and the decomposition's R^2 minus the base model's.",
}


def write_paper_tables(out: str | pathlib.Path, q3: pd.DataFrame, sel: pd.DataFrame,
                       reg: pd.DataFrame, top_k: dict[str, int | None],
                       write: Write = write_plain) -> dict[str, pd.DataFrame]:
    """Write paper_table1.csv, paper_table2.csv, paper_table9.csv (numbers, ours and the paper's)
    and paper_tables.tex (booktabs), each through `write`; returns the display tables for summary.md."""
    out = pathlib.Path(out)
    t1, t2, t9 = table1(q3, top_k), table2(sel), table9(reg, q3, top_k)
    for name, df in (("table1", t1), ("table2", t2), ("table9", t9)):
        write(out / f"paper_{name}.csv", df.to_csv(index=False))
    shown = display_tables(t1, t2, t9)
    tex = [to_latex(shown[k], CAPTIONS[k], label=f"tab:teachdiag-paper-{k}") for k in shown]
    write(out / "paper_tables.tex", "\n".join(tex))
    return shown


def markdown_section(shown: dict[str, pd.DataFrame], markdown, several: bool) -> list[str]:
    """summary.md lines of the paper protocol: the three tables with their captions."""
    md = ["## The paper's protocol (DESIGN \"Analysis\")", ""]
    for k, title in (("table9", "Table 9: β_L vs β_I"), ("table1", "Table 1: Q3 gap"),
                     ("table2", "Tables 2 / 10: mean gain kept")):
        d = shown[k] if several else shown[k].drop(columns="run")
        md += [f"### {title}", "", markdown(d), "", CAPTIONS[k], ""]
    return md

