"""teachdiag: fixed-context diagnostics for on-policy distillation.

    teachdiag probe --teacher T --student S --contexts rollouts.jsonl --out runs/r1

    import teachdiag
    run = teachdiag.run_probe(teacher="T", student="S", contexts="r.jsonl", out="runs/r1")
    run.table, run.record                        # tokens.csv as a DataFrame, run.json as a dict
    teachdiag.load_run("runs/r1"); teachdiag.analyze("runs/r1"); teachdiag.run_train(out="ckpt")
    teachdiag.run_viability(out="runs/v", positions="64")   # viability.csv as a DataFrame
    teachdiag.run_calibrate(out="calib", positions="24")    # the lr sweep's per-lr summary
    teachdiag.run_rollout(student="S", prompts="p.jsonl", out="r.jsonl")   # frozen contexts
    teachdiag.ta_opd_mask(student_logits, teacher_logits, response_mask, budget=0.05)

The API lives in teachdiag/api.py and selectors.py; it is imported on first use, so
`import teachdiag.analysis` stays free of torch. README: "Python API"; DESIGN.md: the quantities.
"""

__version__ = "0.3.0"

_API = {"run_probe": "teachdiag.api", "load_run": "teachdiag.api", "analyze": "teachdiag.api",
        "run_train": "teachdiag.api", "run_viability": "teachdiag.api", "run_calibrate": "teachdiag.api",
        "run_rollout": "teachdiag.api", "Run": "teachdiag.api",
        "ta_opd_mask": "teachdiag.selectors"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'teachdiag' has no attribute {name!r}")
