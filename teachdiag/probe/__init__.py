"""The probe stage: signals from logits, the step rules, and the three instruments for the gain.

    from teachdiag.probe import signals_from_logits, RULES, make_probe, SharedStep, CheckpointScore
    probe = make_probe(student, "all", "reverse_kl", "normalized", lr=1e-3, vocab=V)    # per position
    rows = probe.run_context(student_ids, n_prompt, teacher_logits, positions)

Modules: signals (float64 signals, probe losses), steps (the step-rule table), forward (teacher
logits), exact / fast / linear (the per-position step), shared (the shared step), checkpoint
(two checkpoints scored), rows (a tokens.csv row).
"""

from teachdiag.probe.signals import LOSSES, SIGNALS, kls_from_logits, probe_loss, signals_from_logits
from teachdiag.probe.steps import RULES, StepRule, rule
from teachdiag.probe.exact import SingleStepProbe, select_params
from teachdiag.probe.fast import make_probe
from teachdiag.probe.shared import SharedStep
from teachdiag.probe.checkpoint import CheckpointScore

__all__ = ["LOSSES", "SIGNALS", "kls_from_logits", "probe_loss", "signals_from_logits", "RULES", "StepRule",
           "rule", "SingleStepProbe", "select_params", "make_probe", "SharedStep", "CheckpointScore"]
