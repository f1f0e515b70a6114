"""Held-out selector comparison: after training with each selector, how much did the student move
toward the teacher on contexts it never trained on? (the paper's Table 2/3 question at demo scale)

    bash scripts/heldout_selectors.sh runs/heldout                  # train + checkpoint-gain runs
    python -m teachdiag.analysis.heldout runs/heldout --out data/demo_heldout

The folder holds one checkpoint run per selector, gain_<selector>/ (`teachdiag probe
--student-after train_<selector>/model` over the same held-out contexts). Every selector is scored
on the same positions, so each comparison is paired: the difference of two gains at each
position, averaged, with a 95% cluster-bootstrap CI over contexts (the same resamples for every
selector). Writes heldout_means.csv, heldout_differences.csv, heldout.md, heldout.png (+ .pdf) and
heldout_gains.csv.gz (every selector's gains at every held-out position, the table behind the rest).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import teachdiag.analysis.plots as plots
from teachdiag.analysis.bootstrap import group_mean_draws, percentile_ci
from teachdiag.analysis.report import markdown_table
from teachdiag.errors import InputError
from teachdiag.flags import opt, parse_config
from teachdiag.table import read_tokens

GAINS = {"gain_fkl": "mean fkl drop (nats)", "rel_gain_fkl": "mean G_KLf (fkl drop / fkl)"}
ORDER = ("teachability", "fkl", "entropy", "tip", "teach_entropy", "position", "random", "all")


def load(folder: pathlib.Path) -> dict[str, pd.DataFrame]:
    """selector -> its rows, indexed by (context_id, position) in the first run's order; every run
    must be finished and cover the same positions (an InputError names the folder otherwise)."""
    runs = {}
    for d in sorted(folder.glob("gain_*")):
        csv = next((d / n for n in ("tokens.csv", "tokens.csv.gz") if (d / n).exists()), None)
        if csv is None:  # never compare a selector whose gains are missing without saying so
            raise InputError("no tokens.csv: this selector's checkpoint run is not finished (run the script "
                             "again; it skips what is done)", file=str(d))
        runs[d.name[len("gain_"):]] = read_tokens(csv).set_index(["context_id", "position"])
    if not runs:
        raise InputError("no gain_<selector>/ run folders here", file=str(folder))
    order = [s for s in ORDER if s in runs] + sorted(set(runs) - set(ORDER))
    first = runs[order[0]].index
    for s in order:
        if set(runs[s].index) != set(first) or runs[s].index.has_duplicates:
            raise InputError("its positions differ from the other selectors' runs", file=str(folder / f"gain_{s}"))
    return {s: runs[s].reindex(first) for s in order}  # paired by position, never by row order


def compare(runs: dict[str, pd.DataFrame], gain: str, n_boot: int = 1000, seed: int = 0,
            reference: str = "teachability") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(means, differences): each selector's mean `gain` over the held-out positions finite in every
    run, and reference − each other selector, position by position, both with cluster CIs."""
    first = next(iter(runs.values()))
    ok = np.logical_and.reduce([t["finite"].to_numpy() == 1 for t in runs.values()])
    codes = pd.factorize(first.index.get_level_values("context_id")[ok])[0]
    vals = {s: t[gain].to_numpy(float)[ok] for s, t in runs.items()}
    one = np.ones((1, int(ok.sum())), bool)

    def row(name: str, v: np.ndarray) -> dict:
        lo, hi = percentile_ci(group_mean_draws(v, one, codes, n_boot, seed)[:, 0])
        return {"selector": name, "gain": gain, "mean": float(v.mean()), "ci_low": lo, "ci_high": hi,
                "n_positions": int(ok.sum()), "n_contexts": int(codes.max() + 1)}

    means = pd.DataFrame([row(s, v) for s, v in vals.items()])
    diffs = pd.DataFrame([{**row(f"{reference} − {s}", vals[reference] - v), "other": s}
                          for s, v in vals.items() if s != reference and reference in vals])
    if len(diffs):
        diffs["verdict"] = np.where(diffs["ci_low"] > 0, f"{reference} higher",
                                    np.where(diffs["ci_high"] < 0, f"{reference} lower", "inconclusive"))
    return means, diffs


@dataclass
class HeldoutConfig:
    """Options of `python -m teachdiag.analysis.heldout`."""

    folder: str = field(default="", metadata={"positional": True, "help": "folder with gain_<selector>/ "
                                              "checkpoint runs (scripts/heldout_selectors.sh)"})
    out: str = opt("output folder (default: <folder>/analysis)", "")
    bootstrap: int = opt("cluster-bootstrap resamples over contexts", 1000)
    seed: int = opt("bootstrap seed", 0)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(HeldoutConfig, argv, prog="python -m teachdiag.analysis.heldout",
                       description=__doc__.split("\n")[0])
    folder = pathlib.Path(cfg.folder)
    out = pathlib.Path(cfg.out) if cfg.out else folder / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    runs = load(folder)
    parts = [compare(runs, g, cfg.bootstrap, cfg.seed) for g in GAINS]
    means = pd.concat([m for m, _ in parts], ignore_index=True)
    diffs = pd.concat([d for _, d in parts], ignore_index=True)
    gains = pd.concat([t[["fkl", "fkl_after", *GAINS, "finite"]].reset_index().assign(selector=s)
                       for s, t in runs.items()], ignore_index=True)
    gains[["selector", "context_id", "position", "fkl", "fkl_after", *GAINS, "finite"]].to_csv(
        out / "heldout_gains.csv.gz", index=False, float_format="%.17g")
    means.to_csv(out / "heldout_means.csv", index=False)
    diffs.to_csv(out / "heldout_differences.csv", index=False)
    plots.save(plots.heldout_bars(means, GAINS), out, "heldout")
    fmt = lambda d: d.assign(**{c: d[c].map(lambda v: f"{v:.3g}") for c in ("mean", "ci_low", "ci_high")})  # noqa: E731
    text = ["# Held-out selector comparison", "",
            f"{means['n_positions'].iloc[0]} held-out positions in {means['n_contexts'].iloc[0]} contexts; "
            "95% CIs from a cluster bootstrap over contexts.", "",
            markdown_table(fmt(means)[["gain", "selector", "mean", "ci_low", "ci_high"]]), "",
            markdown_table(fmt(diffs)[["gain", "selector", "mean", "ci_low", "ci_high", "verdict"]]), "",
            "![held-out gain](heldout.png)", ""]
    (out / "heldout.md").write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
