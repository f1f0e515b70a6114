"""`teachdiag calibrate`: sweep the step size on a sample of positions and pick the largest lr
that still stays in the linear regime (calibration.py: measured gain ≈ first-order prediction).

    teachdiag calibrate --positions 24 --optimizer normalized --out calib/   # embedded pair, demo rollouts
    teachdiag calibrate --teacher T --student S --contexts r.jsonl --lrs 1e-5,1e-4,1e-3,1e-2
    python -c "from teachdiag.commands.calibrate import *; run_calibrate(CalibrateConfig(positions='16'))"

Writes calibration.csv (one row per position × lr), calibration.json (chosen lr, rule, per-lr
summary, and the run header every command writes: models with their weight hashes, tokenizers,
contexts) and calibration.png/.pdf to --out, all through the run output (runfolder.RunOutput):
the folder is claimed and locked while the sweep runs, calibration.json (the run record) says
"complete": false from the moment the models have loaded, each file is written whole and renamed
into place, and the record is written again last, with the sweep and "complete": true.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from teachdiag import __version__
from teachdiag.calibration import BAND, GAIN, MAX_NEGATIVE, RULE, choose_lr, parse_lrs, summarize, sweep
from teachdiag.config import (ContextOptions, DeviceOptions, PairOptions, StepOptions, check_positive,
                              fill_embedded)
from teachdiag.contexts import parse_positions, select_positions
from teachdiag.errors import InputError
from teachdiag.flags import opt
from teachdiag.models import resolve_device
from teachdiag.pair import open_pair, read_inputs
from teachdiag.probe.exact import parse_params
from teachdiag.runfolder import RunOutput, releases_locks


@dataclass
class CalibrateConfig(DeviceOptions, StepOptions, ContextOptions, PairOptions):  # listed last-shown first
    """Options of `teachdiag calibrate` (each field's help is its --help text; --lr is not used)."""

    out: str = opt("folder for calibration.csv, .json and .png (files are replaced)", "calib")
    lrs: str = opt("comma-separated step sizes, e.g. 1e-5,1e-4,1e-3 (empty: 10 log-spaced values from "
                   "1e-3x to 1e3x the step rule's default lr)", "")


CALIBRATE_POSITIONS = 64  # cost: N backward + N × len(lrs) forwards
RECORD = "calibration.json"  # the run record: api.run_calibrate reads its "summary"


@releases_locks  # the folder lock is let go when it ends, however
def run_calibrate(cfg: CalibrateConfig, argv: list[str] | None = None) -> tuple[Path, list[str]]:
    """Sweep, write the three files, return (out folder, summary lines). Raises InputError on bad
    input, and (after writing the files) when no lr of the grid is in the linear regime."""
    t0 = time.time()
    lrs = parse_lrs(cfg.lrs, cfg.optimizer)
    fill_embedded(cfg)
    cfg.positions = cfg.positions or str(CALIBRATE_POSITIONS)
    check_positive(top_k=cfg.top_k)
    parse_params(cfg.params)
    device = resolve_device(cfg.device)
    inputs = read_inputs(cfg)  # a bad tokenizer pair or --top-k is refused before --out is touched
    out = Path(cfg.out)
    output = RunOutput(out, RECORD, overwrite=True)  # its files are replaced; two sweeps at once are refused
    picks = select_positions(inputs[0], parse_positions(cfg.positions), cfg.seed)
    pair = open_pair(cfg, device, inputs)
    header = {"teachdiag": __version__, **pair.header("calibrate", argv, asdict(cfg))}
    kept = "nothing of this sweep is kept; free space or fix permissions, then rerun"
    output.start(header, kept)  # no record of an older sweep beside this one's files
    table = sweep(pair.teacher, pair.student, pair.contexts, picks, lrs, pair.vocab, cfg.loss, cfg.optimizer,
                  cfg.params, device, cfg.quiet, cfg.top_k, keep=pair.keep)
    summary = summarize(table)
    lr = choose_lr(summary)

    from teachdiag.analysis import plots

    record = {**header, "chosen_lr": lr,
              "rule": RULE, "band": list(BAND), "max_negative_share": MAX_NEGATIVE, "gain": GAIN[cfg.loss],
              "summary": json.loads(summary.to_json(orient="records")), "seed": cfg.seed,
              "n_positions": len(picks), "wall_s": round(time.time() - t0, 3)}
    with output.faults(kept):
        output.write("calibration.csv", table.to_csv(index=False, float_format="%.17g"))
        title = f"{Path(cfg.student).name} ← {Path(cfg.teacher).name}: loss {cfg.loss}, step {cfg.optimizer}"
        figure = plots.calibration(summary, lr, title, band=BAND, max_negative=MAX_NEGATIVE)
        for suffix, data in plots.encode(figure).items():
            output.write("calibration" + suffix, data)
        output.finish(record)  # last: the sweep is whole

    lo, hi = summary.iloc[0], summary.iloc[-1]
    lines = [f"wrote {out / 'calibration.csv'}, calibration.json and calibration.png",
             f"{len(picks)} positions x {len(lrs)} lrs ({cfg.loss}, {cfg.optimizer}): median gain/first-order "
             f"{lo.median_ratio:.3f} at lr {lo.lr:.3g} ... {hi.median_ratio:.3f} at lr {hi.lr:.3g}"]
    if lr is None:
        raise InputError(f"no lr in the linear regime ({RULE}); see {out / 'calibration.csv'} and try "
                         "smaller --lrs or more --positions", field="--lrs")
    row = summary[summary["lr"] == lr].iloc[0]
    lines.append(f"chosen lr = {lr:.3g}: median ratio {row.median_ratio:.3f}, {row.share_negative:.1%} negative "
                 f"gains (largest lr in the linear regime, see calibration.json)")
    if lr == lrs[-1]:
        lines.append("note: that is the largest lr of the grid; the linear regime may go further (larger --lrs)")
    return out, lines
