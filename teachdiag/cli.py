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
import importlib
import os
import sys

from teachdiag import __version__
from teachdiag.flags import add_dataclass_args, join_negative_values
from teachdiag.errors import InputError


def _probe(cfg, argv: list[str]) -> None:
    from teachdiag.commands.probe import run_probe, summary_lines

    out = run_probe(cfg, argv)
    if _rank() == 0:  # under torchrun, one summary
        print("\n".join(summary_lines(out)))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))  # set by torchrun


def _calibrate(cfg, argv: list[str]) -> None:
    from teachdiag.commands.calibrate import run_calibrate

    print("\n".join(run_calibrate(cfg, argv)[1]))


def _viability(cfg, argv: list[str]) -> None:
    from teachdiag.commands.viability import run_viability, summary_lines

    print("\n".join(summary_lines(run_viability(cfg, argv))))


def _rollout(cfg, argv: list[str]) -> None:
    from teachdiag.commands.rollout import run_rollout

    run_rollout(cfg, argv)


def _analyze(cfg, argv: list[str]) -> None:
    from teachdiag.commands.analyze import run_analyze

    run_analyze(cfg, argv)


def _train(cfg, argv: list[str]) -> None:
    from teachdiag.commands.train import run_train

    run_train(cfg, argv)


# name -> (module of its config class, the class, handler(cfg, argv), one-line description). A
# command's module is imported only when that command runs or shows its --help: importing all of
# them (torch, transformers, scipy, seaborn) took seconds before `teachdiag --version` could answer.
COMMANDS = {
    "probe": ("teachdiag.commands.probe", "ProbeConfig", _probe, "single-step probe on frozen contexts -> tokens.csv"),
    "rollout": ("teachdiag.commands.rollout", "RolloutConfig", _rollout, "sample frozen student rollouts -> contexts JSONL"),
    "analyze": ("teachdiag.analysis.options", "AnalyzeConfig", _analyze,
                "statistics, tables and figures from tokens.csv"),
    "calibrate": ("teachdiag.commands.calibrate", "CalibrateConfig", _calibrate,
                  "sweep the step size, pick an lr in the linear regime"),
    "train": ("teachdiag.commands.train", "TrainConfig", _train,
              "a small OPD trainer (selective masks) that makes θτ for the checkpoint gain"),
    "viability": ("teachdiag.commands.viability", "ViabilityConfig", _viability,
                  "branch viability of a privileged teacher's alternatives -> viability.csv"),
}


def _config_class(name: str) -> type:
    module, cls, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), cls)


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="teachdiag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"teachdiag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None  # the subcommand comes first
    for name, (_, _, _, desc) in COMMANDS.items():
        command = sub.add_parser(name, help=desc, description=desc)
        if name == chosen:  # only the chosen command's options are needed to parse or show --help
            add_dataclass_args(command, _config_class(name))
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    run = COMMANDS[name][2]
    try:
        cfg = _config_class(name)(**args)
        if hasattr(cfg, "threads"):  # DeviceOptions; config.py imports torch, which analyze never needs
            from teachdiag.config import apply_threads

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
