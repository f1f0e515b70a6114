"""The random-init pair the GPU check runs (gpu_check.py): Qwen2 models at real or tiny shapes, and contexts.

    from gpu_pairs import SHAPES, build_pair      # benchmarks/ on sys.path, as gpu_check.py puts it
    teacher, student, contexts = build_pair(Path("work/shapes"), SHAPES["real"], device="cuda")

Real shapes are Qwen2.5-0.5B (student) and Qwen2.5-1.5B (teacher): 151,936 output rows, tied
embeddings, and a tokenizer of 151,665 ids like Qwen2.5's, so every softmax and KL runs over the
real vocabulary and the 271 padded rows are cut as for the real models. (probe_speed.py's qwen2.5
pair pairs those shapes with the tests' 68-token tokenizer, so its signals run over 68 columns.)
Weights are random: speed and memory do not depend on them. The models are built on the device
(initialising 2B parameters on the CPU takes longer than the GPU's whole check), the teacher saved
in bfloat16 as a real bf16 checkpoint would be, the student in float32, each loaded back through
from_pretrained by the stages like any user folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

QWEN25_TOKENS = 151_665  # len(tokenizer) of Qwen2.5; its configs have 151,936 rows

SHAPES = {
    "real": {
        "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2),
        "teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2),
        "vocab_rows": 151_936, "tokens": QWEN25_TOKENS, "contexts": 8, "prompt": 64, "response": 192,
    },
    "tiny": {  # seconds on one CPU thread; two unequal models, as a real pair
        "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
        "teacher": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2),
        "vocab_rows": 512, "tokens": 500, "contexts": 4, "prompt": 8, "response": 12,
    },
}
EOS = "<|endoftext|>"


def make_tokenizer(n_tokens: int):
    """A byte-level BPE tokenizer of the Qwen2 class with n_tokens ids: the 256 byte symbols (so any
    text encodes), synthetic words up to n_tokens − 1, and the end-of-text token last. No merges:
    the contexts are token ids, and nothing here reads text."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({f"Ġw{i}": i for i in range(len(vocab), n_tokens - 1)})
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=EOS, pad_token=None)


def make_model(shape: dict, vocab_rows: int, eos_id: int, seed: int, device: str):
    """A random-init Qwen2 model with tied embeddings on `device`, in float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_rows, tie_word_embeddings=True, max_position_embeddings=32768,
                      eos_token_id=eos_id, bos_token_id=None, pad_token_id=None, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        # logits of std ~2 rather than the init's ~0.02·√d: teacher and student then really differ,
        # so gains are well above float32 noise and the naive cross-check compares numbers, not zeros
        model.get_output_embeddings().weight.mul_(2.0 / (cfg.initializer_range * math.sqrt(cfg.hidden_size)))
    return model


def write_contexts(path: Path, n: int, prompt: int, response: int, n_words: int, seed: int = 0) -> Path:
    """n contexts of random regular token ids: `prompt`-token prompts, `response`-token responses."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"c{i}", "prompt_ids": torch.randint(0, n_words, (prompt,), generator=g).tolist(),
                   "response_ids": torch.randint(0, n_words, (response,), generator=g).tolist()}
            f.write(json.dumps(rec) + "\n")
    return path


def build_pair(root: Path, shape: dict, device: str) -> tuple[str, str, str]:
    """(teacher folder, student folder, contexts file) under root; an existing complete pair is reused."""
    root.mkdir(parents=True, exist_ok=True)
    contexts = root / "contexts.jsonl"
    if contexts.is_file():  # written last: the folders before it are complete
        return str(root / "teacher"), str(root / "student"), str(contexts)
    tok = make_tokenizer(shape["tokens"])
    eos = tok.convert_tokens_to_ids(EOS)
    for name, seed, dtype in (("teacher", 1, torch.bfloat16), ("student", 2, torch.float32)):
        model = make_model(shape[name], shape["vocab_rows"], eos, seed, device)
        model.to(dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        del model
    write_contexts(contexts, shape["contexts"], shape["prompt"], shape["response"], n_words=eos)
    return str(root / "teacher"), str(root / "student"), str(contexts)
