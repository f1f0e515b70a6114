"""The `teachdiag` command: one subcommand per stage, each a config dataclass.

    teachdiag probe --teacher T --student S --contexts rollouts.jsonl --out runs/r1
    teachdiag probe                      # the embedded demo pair on the demo rollouts
    teachdiag rollout --student S --prompts prompts.jsonl --out rollouts.jsonl
    teachdiag analyze runs/r1
    teachdiag calibrate --positions 24 --out calib   # pick an lr in the linear regime
    teachdiag probe --gain shared --lr 1e-2          # one step on all positions' loss (the paper's gain)
    teachdiag train --steps 20 --out ckpt            # short OPD training -> θτ
    teachdiag probe --student-after ckpt/model --positions all   # checkpoint gain θ0 -> θτ
    teachdiag viability                  # branch viability in the embedded self-distillation setting

Each config dataclass field is one flag and its help is its --help text, written once (config.py).
Bad input prints one line `teachdiag: error: ...` and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from teachdiag import __version__
from teachdiag.config import DeviceOptions, apply_threads
from teachdiag.flags import add_dataclass_args, join_negative_values
from teachdiag.errors import InputError


def _probe(cfg, argv: list[str]) -> None:
    from teachdiag.runner import run_probe, summary_lines

    out = run_probe(cfg, argv)
    if _rank() != 0:  # under torchrun, one summary
        return
    step = json.loads((out / "run.json").read_text())["step"]
    if "lr_auto" in step:  # --lr auto: the sweep that chose the lr, next to the table
        import pandas as pd

        from teachdiag.analysis import plots
        from teachdiag.calibrate import BAND, MAX_NEGATIVE

        fig = plots.calibration(pd.DataFrame(step["lr_auto"]["summary"]), step["lr"],
                                f"--lr auto for {cfg.student}: loss {cfg.loss}, step {cfg.optimizer}",
                                band=BAND, max_negative=MAX_NEGATIVE)
        plots.save(fig, out, "calibration")
    print("\n".join(summary_lines(out)))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))  # set by torchrun


def _calibrate(cfg, argv: list[str]) -> None:
    from teachdiag.calibrate import run_calibrate

    print("\n".join(run_calibrate(cfg, argv)[1]))


def _viability(cfg, argv: list[str]) -> None:
    from teachdiag.viability import run_viability, summary_lines

    print("\n".join(summary_lines(run_viability(cfg, argv))))


def _commands() -> dict:
    """name -> (config class, handler(cfg, argv), one-line description); imported lazily."""
    from teachdiag.analysis.command import AnalyzeConfig, run_analyze
    from teachdiag.calibrate import CalibrateConfig
    from teachdiag.rollout import RolloutConfig, run_rollout
    from teachdiag.runner import ProbeConfig
    from teachdiag.train import TrainConfig, run_train
    from teachdiag.viability import ViabilityConfig

    return {
        "probe": (ProbeConfig, _probe, "single-step probe on frozen contexts -> tokens.csv"),
        "rollout": (RolloutConfig, lambda cfg, argv: run_rollout(cfg),
                    "sample frozen student rollouts -> contexts JSONL"),
        "analyze": (AnalyzeConfig, lambda cfg, argv: run_analyze(cfg),
                    "statistics, tables and figures from tokens.csv"),
        "calibrate": (CalibrateConfig, _calibrate, "sweep the step size, pick an lr in the linear regime"),
        "train": (TrainConfig, run_train, "a small OPD trainer (selective masks) that makes θτ for the checkpoint gain"),
        "viability": (ViabilityConfig, _viability,
                      "branch viability of a privileged teacher's alternatives -> viability.csv"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(sys.argv[1:] if argv is None else list(argv))
    commands = _commands()
    parser = argparse.ArgumentParser(prog="teachdiag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"teachdiag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, desc) in commands.items():
        add_dataclass_args(sub.add_parser(name, help=desc, description=desc), cls)
    args = vars(parser.parse_args(argv))
    cls, run, _ = commands[args.pop("command")]
    try:
        cfg = cls(**args)
        if isinstance(cfg, DeviceOptions):
            apply_threads(cfg.threads)
        run(cfg, argv[1:])
    except InputError as exc:
        where = f" [rank {_rank()}]" if "WORLD_SIZE" in os.environ else ""
        print(f"teachdiag{where}: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("teachdiag: interrupted; finished contexts are saved (rerun with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
