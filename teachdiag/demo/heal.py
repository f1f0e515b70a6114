"""Make the embedded student: depth-prune SmolLM2-135M-Instruct, heal it by distillation.

    python -m teachdiag.demo.heal                       # writes teachdiag/demo/data/smollm2-135m-pruned.lora.safetensors
    python -m teachdiag.demo.heal --steps 20 --out /tmp/d.safetensors   # a quick smoke run

Why this student: no registry carries a second model with SmolLM2's tokenizer, and the source
paper's setting is a bigger teacher and a smaller student. Keeping 15 of the teacher's 30
blocks (every other one, and the last) gives a student with a real capacity gap; unhealed it is
useless (confidently wrong: ~11 nats of KL to the teacher), so a short distillation from the
teacher heals it. Only small deltas are trained and shipped: LoRA adapters on every linear layer of the
kept blocks plus the RMSNorm weights (a few MB); teachdiag.demo.zoo merges them into an ordinary
model folder.

Training text (offline, licence-clean): the teacher's own sampled answers (temperature 1) to
prompts this package generates — arithmetic word problems from teachdiag.demo.prompts under a
different seed from the demo set (any question also in the demo set is skipped), and a fixed
list of general instructions written for this file. The loss is the forward KL from the
teacher's next-token distribution, restricted to its top-K tokens plus one bucket for the rest
of the vocabulary, at every response position; teacher top-K log-probabilities are recorded
while the teacher generates, so the teacher is never run twice.

Seeded throughout; torch uses one thread by default so reruns on one machine repeat exactly.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from teachdiag.flags import opt, parse_config
from teachdiag.demo import prompts as prompt_gen
from teachdiag.demo import zoo

GENERAL_INSTRUCTIONS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short story about a cat who learns to swim.",
    "Give three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Describe how to make a cup of tea.",
    "Write a friendly email inviting a neighbour to a picnic.",
    "Why do leaves change colour in autumn?",
    "List five fruits and one fact about each.",
    "Explain what a prime number is, with examples.",
    "How does a bicycle stay upright when it moves?",
    "Write a haiku about the ocean.",
    "What are the main parts of a plant and what do they do?",
    "Summarize the water cycle for a ten-year-old.",
    "Give advice to someone starting to learn the guitar.",
    "Explain how to compute the average of a list of numbers.",
    "Describe a busy market on a Saturday morning.",
    "What is photosynthesis?",
    "Write a short poem about a rainy day in the city.",
    "How can I save money on groceries?",
    "Explain the rules of tic-tac-toe.",
    "What does a librarian do during a typical day?",
    "Why is exercise good for the heart?",
    "Write a dialogue between a robot and a child about friendship.",
    "Explain the difference between a fraction and a decimal.",
    "What should I pack for a weekend camping trip?",
    "Describe the life cycle of a butterfly.",
    "How do you convert hours into minutes? Give an example.",
    "Write a product description for a reusable water bottle.",
    "What are some good habits for a healthy sleep routine?",
    "Explain what gravity is in simple terms.",
    "Tell me a fun fact about octopuses and explain it.",
    "How do I politely decline an invitation?",
    "What is the capital of France, and what is it known for?",
    "Explain how a rainbow forms.",
    "Write a short thank-you note to a teacher.",
    "Why do we have seasons on Earth?",
    "Give step-by-step instructions to plant a tomato seed.",
    "Explain what percent means, using a shop discount as an example.",
    "Describe your ideal weekend in a short paragraph.",
    "What is the difference between a lake and a sea?",
]


@dataclass
class HealConfig:
    """Options of `python -m teachdiag.demo.heal` (field foo_bar is the flag --foo-bar)."""

    out: str = opt("deltas file to write", str(zoo.STUDENT_DELTAS))
    keep: str = opt("teacher blocks kept in the student, comma-separated", "0,2,4,6,8,10,12,14,16,18,20,22,24,26,29")
    rank: int = opt("LoRA rank", 16)
    alpha: float = opt("LoRA scale numerator (scale = alpha / rank)", 32.0)
    steps: int = opt("optimizer steps", 120)
    batch: int = opt("sequences per step", 4)
    lr: float = opt("peak AdamW learning rate (cosine decay)", 2e-3)
    n_problems: int = opt("word problems in the training text", 160)
    problem_seed: int = opt("prompt-generator seed (the demo uses 0)", 1)
    gen_tokens: int = opt("longest teacher answer, in tokens", 128)
    topk: int = opt("teacher tokens kept per position for the loss", 64)
    heldout: int = opt("sequences held out to report the fit", 16)
    seed: int = opt("seed for sampling, initialisation and order", 0)
    threads: int = opt("torch CPU threads (the CPU may be shared)", 1)
    cache: str = opt("optional .safetensors file caching the teacher's text and top-K (reused when present)", "")


# ---------------------------------------------------------------------------------------------
# training text: the teacher's answers, with its top-K log-probabilities at every position


def heal_prompts(cfg: HealConfig) -> list[str]:
    """Word problems (seed cfg.problem_seed, none shared with the demo set) + general instructions."""
    demo = {r["prompt"] for r in prompt_gen.generate(300, seed=0)}
    problems = [r["prompt"] for r in prompt_gen.generate(cfg.n_problems + 300, cfg.problem_seed)
                if r["prompt"] not in demo][: cfg.n_problems]
    return problems + GENERAL_INSTRUCTIONS


@torch.no_grad()
def teacher_text(teacher, tok, texts: list[str], cfg: HealConfig, batch: int = 8) -> list[dict]:
    """Sample one answer per prompt; keep ids and the teacher's top-K at each response position."""
    from transformers import GenerationConfig

    from teachdiag.contexts import encode_prompt

    eos = tok.eos_token_id
    gen_cfg = GenerationConfig(max_new_tokens=cfg.gen_tokens, do_sample=True, temperature=1.0,
                               top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=eos,
                               return_dict_in_generate=True, output_logits=True)
    encoded = [encode_prompt(tok, t) for t in texts]
    examples = []
    t0 = time.time()
    for b in range(0, len(encoded), batch):
        chunk = encoded[b:b + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), eos, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        torch.manual_seed(cfg.seed * 1_000_003 + b)
        out = teacher.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        logits = torch.stack(out.logits, 1).float()  # (B, new, V)
        for i, p in enumerate(chunk):
            resp = out.sequences[i, width:].tolist()
            n = next((j + 1 for j, t in enumerate(resp) if t == eos), len(resp))
            lp = torch.log_softmax(logits[i, :n], -1)
            top = lp.topk(cfg.topk, -1)
            examples.append({"ids": p + resp[:n], "start": len(p),
                             "top_idx": top.indices.to(torch.int32),
                             "top_lp": top.values.to(torch.float32)})
        print(f"  teacher text {len(examples)}/{len(encoded)} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return examples


# ---------------------------------------------------------------------------------------------
# the student: kept blocks + LoRA adapters + trainable norms


class LoRALinear(nn.Module):
    """y = W x + scale · B A x, W frozen; B starts at zero so training starts from the pruned model."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features).uniform_(
            -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features), generator=gen))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def pruned_student(teacher_path: Path, kept: list[int]):
    """The teacher with only blocks `kept`, as a float32 model (no deltas yet)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(teacher_path))
    config.num_hidden_layers = len(kept)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = zoo.prune_state(load_file(str(teacher_path / "model.safetensors")), kept)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


def add_lora(model, rank: int, scale: float, seed: int) -> list[tuple[str, nn.Parameter]]:
    """Wrap the targets in LoRA and unfreeze the norms; return the trainable (name, param)s."""
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    trainable = []
    for i, layer in enumerate(model.model.layers):
        for target in LORA_TARGETS:
            parent_name, child = target.split(".")
            parent = getattr(layer, parent_name)
            wrapped = LoRALinear(getattr(parent, child), rank, scale, gen)
            setattr(parent, child, wrapped)
            prefix = f"model.layers.{i}.{target}"
            trainable += [(f"{prefix}.lora_A", wrapped.lora_A), (f"{prefix}.lora_B", wrapped.lora_B)]
        for norm in NORMS:
            p = getattr(layer, norm).weight
            p.requires_grad_(True)
            trainable.append((f"model.layers.{i}.{norm}.weight", p))
    model.model.norm.weight.requires_grad_(True)
    trainable.append(("model.norm.weight", model.model.norm.weight))
    return trainable


def bucket_kl(student_logits: torch.Tensor, top_idx: torch.Tensor, top_lp: torch.Tensor
              ) -> torch.Tensor:
    """Forward KL over the teacher's top-K tokens plus one bucket for the rest, per position.

    student_logits (N, V); top_idx (N, K) int; top_lp (N, K) teacher log-probs. Returns (N,) nats.
    """
    s_lp = torch.log_softmax(student_logits.float(), -1)
    s_top = s_lp.gather(-1, top_idx.long())  # (N, K)
    t_p = top_lp.exp()
    t_rest = (1 - t_p.sum(-1)).clamp_min(1e-8)
    s_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-8)
    return (t_p * (top_lp - s_top)).sum(-1) + t_rest * (t_rest.log() - s_rest.log())


def batch_loss(model, examples: list[dict]) -> tuple[torch.Tensor, int]:
    """Mean bucket KL over all response positions of a batch (right-padded)."""
    width = max(len(e["ids"]) for e in examples) - 1
    ids = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T) inputs
    mask = torch.zeros_like(ids)
    rows, cols, idx, lp = [], [], [], []
    for i, e in enumerate(examples):
        seq = e["ids"][:-1]  # the last token is predicted, never input
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        n = len(e["ids"]) - e["start"]
        rows += [i] * n
        cols += list(range(e["start"] - 1, e["start"] - 1 + n))
        idx.append(e["top_idx"])
        lp.append(e["top_lp"])
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])  # (N, V)
    kl = bucket_kl(logits, torch.cat(idx), torch.cat(lp))
    return kl.mean(), len(rows)


@torch.no_grad()
def heldout_kl(model, examples: list[dict], batch: int = 8) -> float:
    total, n = 0.0, 0
    for b in range(0, len(examples), batch):
        loss, k = batch_loss(model, examples[b:b + batch])
        total, n = total + loss.item() * k, n + k
    return total / max(n, 1)


def save_deltas(trainable: list[tuple[str, nn.Parameter]], cfg: HealConfig, kept: list[int],
                report: dict) -> Path:
    """Write the deltas (bf16 LoRA, float32 norms) and the metadata zoo needs to merge them."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in trainable:
        t = p.detach().contiguous()
        tensors[name] = t.to(torch.bfloat16) if ".lora_" in name else t.to(torch.float32)
    meta = {"format": "pt", "kept_layers": json.dumps(kept),
            "lora_scale": json.dumps(cfg.alpha / cfg.rank), "teacher": json.dumps(zoo.TEACHER),
            "heal_config": json.dumps({k: v for k, v in asdict(cfg).items()
                                       if k not in ("out", "cache")}),  # no local paths
            "report": json.dumps(report)}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def _write_cache(path: Path, examples: list[dict]) -> None:
    """The teacher's text and top-K as safetensors (a torch.save file would be unpickled when read)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, e in enumerate(examples):
        tensors.update({f"{i}.ids": torch.tensor(e["ids"]), f"{i}.start": torch.tensor([e["start"]]),
                        f"{i}.top_idx": e["top_idx"].contiguous(), f"{i}.top_lp": e["top_lp"].contiguous()})
    save_file(tensors, str(path), metadata={"examples": str(len(examples))})


def _read_cache(path: Path) -> list[dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:  # a .pt cache of an older version is refused here, never unpickled
        n = int((f.metadata() or {})["examples"])
    t = load_file(str(path))
    return [{"ids": t[f"{i}.ids"].tolist(), "start": int(t[f"{i}.start"][0]), "top_idx": t[f"{i}.top_idx"],
             "top_lp": t[f"{i}.top_lp"]} for i in range(n)]


def heal(cfg: HealConfig) -> Path:
    """Generate the training text, train the deltas, save them; returns the deltas path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    teacher_path = zoo.teacher_dir()
    tok = AutoTokenizer.from_pretrained(str(teacher_path))
    kept = [int(x) for x in cfg.keep.split(",")]

    cache = Path(cfg.cache) if cfg.cache else None
    if cache is not None and cache.is_file():
        examples = _read_cache(cache)
    else:
        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_path), dtype=torch.float32).eval()
        examples = teacher_text(teacher, tok, heal_prompts(cfg), cfg)
        del teacher
        if cache is not None:
            _write_cache(cache, examples)
    t_text = time.time() - t_start

    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    held = [examples[i] for i in order[: cfg.heldout]]
    train = [examples[i] for i in order[cfg.heldout:]]

    model = pruned_student(teacher_path, kept)
    trainable = add_lora(model, cfg.rank, cfg.alpha / cfg.rank, cfg.seed)
    kl_before = heldout_kl(model, held)
    print(f"held-out KL before healing: {kl_before:.3f} nats", file=sys.stderr, flush=True)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    rng = random.Random(cfg.seed + 1)
    queue: list[int] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        if len(queue) < cfg.batch:
            more = list(range(len(train)))
            rng.shuffle(more)
            queue += more
        batch, queue = [train[i] for i in queue[: cfg.batch]], queue[cfg.batch:]
        loss, _ = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    kl_after = heldout_kl(model, held)
    print(f"held-out KL after healing: {kl_after:.3f} nats", file=sys.stderr, flush=True)
    report = {"heldout_kl_before": round(kl_before, 4), "heldout_kl_after": round(kl_after, 4),
              "train_sequences": len(train), "heldout_sequences": len(held),
              "train_positions": sum(len(e["ids"]) - e["start"] for e in train),
              "seconds_text": round(t_text), "seconds_train": round(time.time() - t0),
              "torch": torch.__version__}
    return save_deltas(trainable, cfg, kept, report)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(HealConfig, argv, prog="python -m teachdiag.demo.heal",
                       description="Heal the pruned SmolLM2 student; write its deltas.")
    path = heal(cfg)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
