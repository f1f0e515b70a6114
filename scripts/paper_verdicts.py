"""The paper's three contrasts, per run, from `teachdiag analyze --protocol paper` output: a markdown table.

    teachdiag analyze runs/pp runs/shared runs/ckpt --protocol paper --out runs/paper
    python scripts/paper_verdicts.py runs/paper            # paste into a README or a paper draft

Contrasts (arXiv 2605.26844, gain G_KLf, no winsorising):
  1. β_L > β_I: the gap's context-clustered 95% CI (paper_table9.csv);
  2. Q3 high-C minus low-C gain > 0: its CI (paper_table1.csv);
  3. teachability keeps more gain than raw KL at 3% and 5%: the two selectors' CIs (paper_table2.csv).
Verdicts: "holds" where the CI (for 3: both selectors' CIs, which must not overlap) lies on the
paper's side of 0, "does not hold" where it lies on the other side, else "inconclusive".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "inconclusive"


def ci(est: float, lo: float, hi: float, spec: str = "+.3f") -> str:
    return f"{est:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def rows(folder: Path) -> list[dict]:
    t9 = pd.read_csv(folder / "paper_table9.csv")
    t1 = pd.read_csv(folder / "paper_table1.csv")
    t2 = pd.read_csv(folder / "paper_table2.csv")
    out = []
    for run in t9["run"].unique():
        b = t9[(t9.run == run) & (t9.gain == "G_KLf") & (t9.winsor == 0)].iloc[0]
        q = t1[(t1.run == run) & (t1.gain == "G_KLf")].iloc[0]
        row = {"run": run, "β_L / β_I": f"{b.beta_L:+.3f} / {b.beta_I:+.3f}",
               "β_L − β_I": f"{ci(b.gap, b.ci_low, b.ci_high)} {verdict(b.ci_low, b.ci_high)}",
               "Q3 high−low C": f"{ci(q.gap, q.ci_low, q.ci_high, '+.4f')} {verdict(q.ci_low, q.ci_high)}"}
        for budget in (0.03, 0.05):
            s = t2[(t2.run == run) & (t2.gain == "G_KLf") & (t2.winsor == 0) & (t2.budget == budget)]
            te, kl = (s[s.selector == name].iloc[0] for name in ("teachability", "raw KL"))
            v = verdict(te.ci_low - kl.ci_high, te.ci_high - kl.ci_low)  # non-overlapping CIs decide
            row[f"teach vs raw KL {budget:.0%}"] = f"{te.mean_gain:.4f} vs {kl.mean_gain:.4f} {v}"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    table = pd.DataFrame([r for folder in argv for r in rows(Path(folder))])
    cols = list(table.columns)
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in table.itertuples(index=False):
        print("| " + " | ".join(map(str, r)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
