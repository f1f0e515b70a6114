"""The commands: each module holds one command's config dataclass (its fields are the flags) and its
`run_*` function, and nothing a library user would call on its own. The CLI (cli.py) and the Python
API (api.py) both call these, so the two front doors write the same files, figures included.

    probe.py      ProbeConfig, run_probe, summary_lines      contexts -> tokens.csv + run.json
    rollout.py    RolloutConfig, run_rollout                 prompts -> frozen contexts JSONL
    analyze.py    run_analyze (config: analysis/options.py)  tokens.csv -> tables, figures, summary
    calibrate.py  CalibrateConfig, run_calibrate             the lr sweep (calibration.py)
    train.py      TrainConfig, run_train                     a small OPD trainer (training.py)
    viability.py  ViabilityConfig, run_viability             branch viability (branches.py)

Arrows run one way: commands import the library (pair, probe, analysis, training, ...); no
library module imports a command.
"""
