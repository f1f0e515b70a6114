"""A teacher and a student over one vocabulary (TRL's trainers refuse different vocab sizes), saved
to folders like conftest's pair, and the small TRL configs and datasets the TRL tests share."""

from __future__ import annotations

from pathlib import Path

from conftest import make_model, make_tokenizer

ROWS = 72  # output rows of both models: the 68-token tokenizer padded, as real checkpoints are
PROMPTS = ["abc de", "fg hij k", "lmn o", "pq rs tu", "vw xyz", "ab ba ab", "cd dc", "ef fe ef"]


def save_same_vocab_pair(root: Path) -> tuple[str, str]:
    """(teacher folder, student folder): a Qwen3 teacher and a Qwen2 student, 72 output rows each."""
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token  # TRL pads with it
    paths = []
    for name, arch, seed in (("teacher", "qwen3", 1), ("student", "qwen2", 2)):
        path = root / name
        make_model(arch, ROWS, seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def common_args(out: Path, steps: int = 3, accumulation: int = 1) -> dict:
    """TrainingArguments every TRL test shares: CPU, float32, 2 rows per step, no saving or reporting."""
    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                seed=0, dataloader_num_workers=0)
