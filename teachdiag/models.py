"""Load teacher and student through the same `from_pretrained` path users use.

    from teachdiag.models import load_model, load_tokenizer, tokenizer_fingerprint
    tok = load_tokenizer("path/or/hf-id")
    model = load_model("path/or/hf-id", dtype="float32", device="cpu")
    ctxs, tok, fingerprint = load_inputs(cfg)          # a run's contexts, checked tokenizers
    teacher, student = load_models(cfg, device, ctxs, len(tok))

Every failure to load becomes an InputError (one line, exit code 2 in the CLI).
`trust_remote_code` stays off unless the caller asks for it: a model folder whose config
points at custom code is refused rather than executed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from teachdiag.demo import zoo
from teachdiag.contexts import Context, check_token_ids, load_contexts, tokenize_text_records
from teachdiag.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without it is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU", field="--device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda)", field="--device")
    return torch.device(device)


def _check_exists(name_or_path: str, what: str) -> str:
    path = zoo.resolve(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise InputError(f"{what} model folder not found: {path}", field=f"--{what}")
    return str(Path(path).expanduser()) if looks_local else path


REMOTE_CODE = "asks to load custom code (auto_map); pass --trust-remote-code if you trust it"


def _refuse_remote_code(path: str, what: str, trust_remote_code: bool) -> None:
    """A local folder whose config names its own code is refused, not silently run or ignored."""
    if trust_remote_code or not Path(path).is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        cfg = Path(path) / name
        try:
            auto_map = cfg.is_file() and json.loads(cfg.read_text()).get("auto_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise InputError("is not valid JSON", file=str(cfg), field=f"--{what}") from None
        if auto_map:
            raise InputError(f"{name} {REMOTE_CODE}", file=str(cfg), field=f"--{what}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def load_tokenizer(name_or_path: str, what: str = "student", trust_remote_code: bool = False):
    """The model's tokenizer (fast when available)."""
    from transformers import AutoTokenizer

    path = _check_exists(name_or_path, what)
    _refuse_remote_code(path, what, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise InputError(f"cannot load tokenizer of {path!r}: {_first_line(exc)}",
                         field=f"--{what}") from None


def load_model(name_or_path: str, what: str = "student", dtype: str = "float32",
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               device_map: str | None = None):
    """A causal LM in eval mode on `device`, weights in `dtype`.

    device_map="auto" lets accelerate spread the model over the visible GPUs (then CPU), for a
    teacher too big for one GPU; `device` is ignored then. Only the teacher: the student is
    stepped in float32 and must sit on one device with its gradient and a copy of θ0.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    path = _check_exists(name_or_path, what)
    _refuse_remote_code(path, what, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "auto_map", None) and not trust_remote_code:  # hub ids: same rule as folders
            raise InputError(f"its config {REMOTE_CODE}", field=f"--{what}")
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            **({"device_map": device_map} if device_map else {}))
    except InputError:
        raise
    except Exception as exc:
        msg = _first_line(exc)
        if "trust_remote_code" in str(exc):
            msg = f"its config {REMOTE_CODE}"
        raise InputError(f"cannot load model {path!r}: {msg}", field=f"--{what}") from None
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def vocab_rows(model) -> int:
    """Rows of the output embedding (may exceed the tokenizer: padded vocabularies)."""
    return int(model.get_output_embeddings().weight.shape[0])


def config_sha256(model) -> str:
    """Hash of the full model config, so run.json pins the architecture."""
    text = model.config.to_json_string(use_diff=False)
    # the dtype and the local path are not part of the architecture
    cfg = {k: v for k, v in json.loads(text).items() if k not in ("dtype", "torch_dtype", "_name_or_path")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the vocabulary, merges and special tokens: equal iff the tokenizers agree."""
    payload: dict = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
                     "special": sorted(map(str, tok.all_special_tokens))}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        payload["merges"] = model.get("merges")
        payload["type"] = model.get("type")
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def check_same_tokenizer(teacher_tok, student_tok, teacher: str, student: str) -> str:
    """Refuse a pair whose tokenizers differ; return the shared fingerprint."""
    ft, fs = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if ft != fs:
        raise InputError(f"teacher and student tokenizers differ ({teacher}: {ft[:12]}, "
                         f"{student}: {fs[:12]}); teachdiag compares distributions over one "
                         "shared vocabulary", field="--teacher")
    return fs


def load_inputs(cfg) -> tuple[list[Context], object, str]:
    """(contexts as token ids, student tokenizer, tokenizer fingerprint); refuses a pair whose
    tokenizers differ. `cfg`: a ProbeConfig or anything with the same model/contexts fields."""
    ctxs = load_contexts(cfg.contexts, cfg.max_response_tokens or None)
    s_tok = load_tokenizer(cfg.student, "student", cfg.trust_remote_code)
    t_tok = load_tokenizer(cfg.teacher, "teacher", cfg.trust_remote_code)
    fingerprint = check_same_tokenizer(t_tok, s_tok, cfg.teacher, cfg.student)
    return tokenize_text_records(ctxs, s_tok, cfg.max_response_tokens or None), s_tok, fingerprint


def load_models(cfg, device: torch.device, ctxs: list[Context], vocab: int):
    """(teacher, student), the student in float32 on `device`; checks vocabularies and lengths."""
    teacher = load_model(cfg.teacher, "teacher", cfg.dtype, device, cfg.trust_remote_code,
                         device_map=getattr(cfg, "teacher_device_map", "") or None)
    student = load_model(cfg.student, "student", "float32", device, cfg.trust_remote_code)
    for who, model in (("teacher", teacher), ("student", student)):
        if vocab > vocab_rows(model):
            raise InputError(f"tokenizer has {vocab} tokens but the {who} has only {vocab_rows(model)} "
                             "output rows", field=f"--{who}")
    max_pos = min(getattr(m.config, "max_position_embeddings", None) or 10**9 for m in (teacher, student))
    check_token_ids(ctxs, vocab, max_pos)
    return teacher, student
