"""How much does serving top-K change which tokens TA-OPD keeps? The demo's H, D, C from full
distributions against the same from each side's top-K lists (probe/topk.py), on every position.

    python scripts/topk_vs_full.py signals --out data/demo_topk_signals      # ~15 min, 2 CPU threads
    python scripts/topk_vs_full.py compare data/demo_topk_signals            # seconds: comparison.csv/.md

`signals` forwards the embedded teacher and student once per demo context (θ0) and writes
signals.csv.gz: one row per position, H/D/C under --signals full, topk (C exact) and topk_lb (C
from the teacher's list only), and fkl. `compare` writes, for each top-K mode against full:
the Spearman correlation of each score over all positions, and the overlap of the positions the
released TA-OPD rule keeps at 5% (scores.ta_opd_keep per batch of 8 contexts in file order, as
`teachdiag train --batch 8` would see them at θ0), |kept_full ∩ kept_topk| / |kept_full|; and, where
data/demo_checkpoint_tokens.csv.gz has the same positions, the mean checkpoint gain G_KLf of what
each mode keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

MODES = ("full", "topk", "topk_lb")
SCORES = ("topk_entropy", "union_fkl", "compat_mass", "teachability", "entropy", "tip", "ca_softor")
SELECTORS = ("teachability", "entropy", "tip")
BATCH, BUDGET = 8, 0.05


def compute_signals(out: Path, threads: int) -> Path:
    """One θ0 forward of each model per context; H, D, C in every mode from the same logits."""
    import torch

    from teachdiag.config import fill_embedded
    from teachdiag.pair import open_pair
    from teachdiag.probe.forward import teacher_logits, view_logits
    from teachdiag.probe.signals import signals_from_logits
    from teachdiag.progress import progress
    from teachdiag.commands.probe import ProbeConfig

    torch.set_num_threads(threads)
    cfg = ProbeConfig(device="cpu")
    fill_embedded(cfg)
    pair = open_pair(cfg, torch.device("cpu"))
    ctxs, teacher, student, match, keep = pair.contexts, pair.teacher, pair.student, pair.match, pair.keep
    rows, bar = [], progress(len(ctxs), "signals", "context")
    for c in ctxs:
        pos = list(range(len(c.response_ids)))
        zs = view_logits(student, c.prompt_ids, c.response_ids, pos, match.vocab, "cpu")  # (P, V)
        zt = teacher_logits(teacher, c, pos, match.vocab, "cpu")
        y = torch.tensor(c.response_ids)
        got = {m: signals_from_logits(zs, zt, y, 16, keep, m) for m in MODES}
        part = {"context_id": c.id, "position": pos, "response_length": len(pos), "fkl": got["full"]["fkl"].numpy()}
        for m in MODES:
            for k in ("topk_entropy", "union_fkl", "compat_mass"):
                part[f"{k}_{m}"] = got[m][k].numpy()
        rows.append(pd.DataFrame(part))
        bar.update()
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "signals.csv.gz"
    pd.concat(rows, ignore_index=True).to_csv(path, index=False, float_format="%.10g")
    (out / "signals.json").write_text(json.dumps({"pair": "embedded demo (smollm2-135m → smollm2-135m-pruned)",
                                                  "contexts": cfg.contexts, "top_k": 16, "modes": MODES,
                                                  "teacher_dtype": cfg.dtype}, indent=2) + "\n")
    return path


def mode_scores(df: pd.DataFrame, mode: str) -> dict[str, np.ndarray]:
    """The raw signals of one mode and the run-normalised selector scores (scores.selector_scores)."""
    from teachdiag.scores import selector_scores

    sig = {k: df[f"{k}_{mode}"].to_numpy() for k in ("topk_entropy", "union_fkl", "compat_mass")}
    sig["fkl"] = df["fkl"].to_numpy()
    out = dict(sig)
    for name in ("teachability", "entropy", "tip", "ca_softor"):
        out[name] = selector_scores(sig, name)
    return out


def kept_by_batches(df: pd.DataFrame, mode: str, selector: str) -> np.ndarray:
    """(N,) bool: the released rule at BUDGET over each batch of BATCH contexts, in file order."""
    from teachdiag.selectors import keep_positions

    ctx = pd.factorize(df["context_id"])[0]
    keep = np.zeros(len(df), bool)
    for b in range(0, ctx.max() + 1, BATCH):
        rows = np.flatnonzero((ctx >= b) & (ctx < b + BATCH))
        part = df.iloc[rows]
        sig = {k: part[f"{k}_{mode}"].to_numpy() for k in ("topk_entropy", "union_fkl", "compat_mass")}
        sig |= {"fkl": part["fkl"].to_numpy(), "sample": ctx[rows], "position": part["position"].to_numpy(),
                "response_length": part["response_length"].to_numpy()}
        keep[rows] = keep_positions(sig, selector, BUDGET)
    return keep


def compare(folder: Path, gains: Path | None) -> pd.DataFrame:
    from scipy.stats import spearmanr

    df = pd.read_csv(folder / "signals.csv.gz", dtype={"context_id": str})
    g = None
    if gains is not None and gains.is_file():
        ck = pd.read_csv(gains, dtype={"context_id": str}, usecols=["context_id", "position", "fkl", "fkl_after"])
        ck["G_KLf"] = (ck["fkl"] - ck["fkl_after"]) / (ck["fkl"] + 1e-12)
        g = df[["context_id", "position"]].merge(ck[["context_id", "position", "G_KLf"]], how="left")["G_KLf"].to_numpy()
    full = mode_scores(df, "full")
    rows = []
    for mode in MODES[1:]:
        other = mode_scores(df, mode)
        for name in SCORES:
            rows.append({"mode": mode, "what": "spearman", "score": name,
                         "value": spearmanr(full[name], other[name]).statistic})
        for sel in SELECTORS:
            a, b = kept_by_batches(df, "full", sel), kept_by_batches(df, mode, sel)
            rows.append({"mode": mode, "what": f"overlap_{BUDGET:g}", "score": sel, "value": (a & b).sum() / a.sum(),
                         "kept_full": int(a.sum()), "kept_mode": int(b.sum())})
            if g is not None:
                for who, m in (("full", a), (mode, b)):
                    rows.append({"mode": mode, "what": f"mean_G_KLf_kept_{who}", "score": sel,
                                 "value": float(np.nanmean(g[m]))})
    res = pd.DataFrame(rows)
    res.to_csv(folder / "comparison.csv", index=False)
    (folder / "comparison.md").write_text(markdown(res, len(df)))
    return res


def markdown(res: pd.DataFrame, n: int) -> str:
    lines = [f"# Top-K signals against full distributions, the embedded demo ({n:,} positions, K = 16)", "",
             "Spearman correlation of each score over all positions (full vs mode):", "",
             "| score | topk (C exact) | topk_lb (C from the teacher's list) |", "| --- | --- | --- |"]
    sp = res[res.what == "spearman"].pivot(index="score", columns="mode", values="value")
    for s in SCORES:
        lines.append(f"| {s} | {sp.loc[s, 'topk']:.4f} | {sp.loc[s, 'topk_lb']:.4f} |")
    lines += ["", f"Overlap of the released TA-OPD rule's {BUDGET:.0%} selection (batches of {BATCH} contexts):", "",
              "| selector | topk | topk_lb |", "| --- | --- | --- |"]
    ov = res[res.what.str.startswith("overlap")].pivot(index="score", columns="mode", values="value")
    for s in SELECTORS:
        lines.append(f"| {s} | {ov.loc[s, 'topk']:.3f} | {ov.loc[s, 'topk_lb']:.3f} |")
    kept = res[res.what.str.startswith("mean_G_KLf")]
    if len(kept):
        lines += ["", "Mean checkpoint gain G_KLf of what each mode keeps (data/demo_checkpoint_tokens.csv.gz):", "",
                  "| selector | full | topk | topk_lb |", "| --- | --- | --- | --- |"]
        for s in SELECTORS:
            k = kept[kept.score == s]
            val = {w.removeprefix("mean_G_KLf_kept_"): v for w, v in zip(k.what, k.value)}
            lines.append(f"| {s} | {val['full']:.5f} | {val['topk']:.5f} | {val['topk_lb']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signals")
    s.add_argument("--out", default="data/demo_topk_signals")
    s.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("folder")
    c.add_argument("--gains", default="data/demo_checkpoint_tokens.csv.gz")
    a = ap.parse_args(argv)
    if a.cmd == "signals":
        print(compute_signals(Path(a.out), a.threads), file=sys.stderr)
    else:
        print(markdown(compare(Path(a.folder), Path(a.gains)), 0).split("\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
