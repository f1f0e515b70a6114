"""The embedded demo: a real teacher/student pair and its frozen rollouts, shipped with the package.

    from teachdiag.demo import DEMO_ROLLOUTS, DEMO_PROMPTS, SELFDISTILL_ROLLOUTS, zoo
    zoo.resolve("smollm2-135m-pruned")      # builds the student folder on first use

`data/` here is package data (installed by a plain `pip install .`): the 300 demo rollouts, the
prompts they answer, and the student's LoRA/norm deltas; and the self-distillation setting
(SELFDISTILL_*: SmolLM2-135M-Instruct's own rollouts on one-step problems, each with the teacher's
privileged view, a worked solution, as teacher_prompt_ids). How each was made: data/README.md at the
repository root. zoo builds the models, heal trains the student's deltas, prompts writes the prompts.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEMO_ROLLOUTS = DATA / "demo_rollouts.jsonl"
DEMO_PROMPTS = DATA / "prompts.jsonl"
SELFDISTILL_PROMPTS = DATA / "selfdistill_prompts.jsonl"
SELFDISTILL_ROLLOUTS = DATA / "selfdistill_rollouts.jsonl"
SELFDISTILL_MODEL = "smollm2-135m"  # student and privileged teacher: the same weights
