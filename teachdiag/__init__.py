"""teachdiag: fixed-context diagnostics for on-policy distillation.

    teachdiag probe --teacher T --student S --contexts rollouts.jsonl --out runs/r1

See README.md; the quantities are defined in DESIGN (signals, single-step probe).
"""

__version__ = "0.1.0"
