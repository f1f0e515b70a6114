"""Shared fixtures: tiny random-init models saved to folders, loaded back through from_pretrained.

No network: the tokenizer is a word-level one built here, and every model is made from a
config (Qwen2, Qwen3, Llama), with teacher and student padded to different vocabulary sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# skip helper for tests that need a GPU: `@requires_cuda` or `pytestmark = [pytest.mark.gpu, requires_cuda]`
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available())")
N_WORDS = 26 + 10 + 5 + 26  # regular tokens (ids 0..N_WORDS-1); <|endoftext|> comes after


def make_tokenizer(drop_merge: bool = False):
    """A small byte-level BPE tokenizer of the Qwen2 kind (the class real Qwen models use).

    drop_merge=True gives a tokenizer that differs in one merge: the mismatch test's input.
    """
    from transformers import Qwen2Tokenizer

    chars = list(LETTERS) + list("0123456789") + list(".,!?") + ["Ġ"]  # Ġ = byte-level space
    merged = ["Ġ" + c for c in LETTERS]
    vocab = {t: i for i, t in enumerate(chars + merged)}
    merges = [("Ġ", c) for c in LETTERS][: 25 if drop_merge else 26]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token=None)


def make_model(arch: str, vocab_rows: int, seed: int, tied: bool = False, layers: int = 2):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, eos_token_id=N_WORDS, bos_token_id=None, pad_token_id=None)
    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                          "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = cfg_cls(**common, **({"head_dim": 8} if arch == "qwen3" else {}))
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # larger logits than the default init, so distributions really differ
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def save_pair(root: Path, student_arch="qwen2", teacher_arch="qwen3", student_tied=False,
              student_layers=2) -> tuple[str, str]:
    """Teacher (112 rows) and student (128 rows) over one 68-token tokenizer."""
    tok = make_tokenizer()
    paths = []
    for name, arch, rows, seed, tied, layers in (("teacher", teacher_arch, 112, 1, False, 2),
                                                 ("student", student_arch, 128, 2, student_tied, student_layers)):
        path = root / name
        make_model(arch, rows, seed, tied, layers).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def write_contexts(path: Path, n: int = 4, seed: int = 0, teacher_view: bool = True) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = torch.randint(0, N_WORDS, (3 + i % 3,), generator=g).tolist()
            resp = torch.randint(0, N_WORDS, (4 + i % 4,), generator=g).tolist()
            rec = {"id": f"c{i}", "prompt_ids": prompt, "response_ids": resp, "meta": {"i": i}}
            if teacher_view and i % 2 == 0:
                rec["teacher_prompt_ids"] = torch.randint(0, N_WORDS, (6,), generator=g).tolist()
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[str, str]:
    """(teacher folder, student folder): Qwen3 teacher, Qwen2 student."""
    return save_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[str, str]:
    """Qwen2 teacher, Llama student with tied embeddings and 3 blocks."""
    return save_pair(tmp_path_factory.mktemp("llama_pair"), "llama", "qwen2", student_tied=True, student_layers=3)


@pytest.fixture
def contexts(tmp_path) -> Path:
    return write_contexts(tmp_path / "ctx.jsonl")


@pytest.fixture
def one_thread():
    """For bitwise comparisons: with several threads torch may split a short row sum differently (1e-16 off)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stepped_peaks(monkeypatch):
    """watch(module) -> a list that gets steps.stepped's peak_bytes (the θ0 copies held at once) of
    every step `module` takes through its own `stepped` name."""
    import contextlib

    from teachdiag.probe import steps

    def watch(module) -> list[int]:
        peaks = []

        @contextlib.contextmanager
        def spy(*args):
            with steps.stepped(*args) as stats:
                yield stats
            peaks.append(stats.peak_bytes)

        monkeypatch.setattr(module, "stepped", spy)
        return peaks

    return watch
