"""Load teacher and student through the same `from_pretrained` path users use.

    from teachdiag.models import load_model, load_tokenizer, load_inputs, load_models, model_record
    tok = load_tokenizer("path/or/hf-id")
    model = load_model("path/or/hf-id", dtype="float32", device="cpu")   # or a PEFT adapter folder
    ctxs, tok, match = load_inputs(cfg)       # contexts as ids, student tokenizer, TokenizerMatch
    teacher, student = load_models(cfg, device, ctxs, match.vocab)
    model_record("path/or/hf-id", model, "float32")                      # run.json's model entry

Every failure to load becomes an InputError (one line, exit code 2 in the CLI); a hub id that
cannot be reached fails in seconds. `trust_remote_code` stays off unless the caller asks for it:
a model folder whose config points at custom code is refused rather than executed. Weights load
from safetensors only (a .bin would be unpickled). Tokenizers: tokenizers.py; adapters: adapters.py;
what the run record says about a model: provenance.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from teachdiag.adapters import adapter_base, adapter_weights, is_adapter, merge_adapter
from teachdiag.contexts import Context, check_token_ids, load_contexts, tokenize_text_records
from teachdiag.demo import zoo
from teachdiag.errors import InputError
from teachdiag.provenance import vocab_rows
from teachdiag.tokenizers import PROBE_TEXTS, TokenizerMatch, compare_tokenizers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without it is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU", field="--device")
    if not device.startswith(("cpu", "cuda")):
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda)", field="--device")
    try:  # "cpu:0" as a Trainer's args.device prints it is the CPU too
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda[:N])", field="--device") from None


def _check_exists(name_or_path: str, what: str) -> str:
    """The local folder or hub id a name stands for; a missing folder or an unreachable hub id is
    an InputError, found in seconds rather than after transformers' minute of retries."""
    path = zoo.resolve(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise InputError(f"{what} model folder not found: {path}", field=f"--{what}")
    if not looks_local:
        _check_hub(path, what)
    return str(Path(path).expanduser()) if looks_local else path


def _offline() -> bool:
    import os

    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: let from_pretrained word it
        return False


def _hub_reachable(repo_id: str, timeout: float = 5.0) -> bool:
    """One quick request to the hub (honours proxies and HF_ENDPOINT). A reply of any kind,
    even 404 or 401, counts as reachable; only a network failure or silence does not."""
    import threading

    result: list[bool] = []

    def ask() -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            HfApi().model_info(repo_id, timeout=timeout)
            result.append(True)
        except HfHubHTTPError:  # the hub answered (not found, gated, ...): from_pretrained explains
            result.append(True)
        except Exception:
            result.append(False)

    # a thread, because name resolution can hang longer than any socket timeout
    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(result and result[0])


def _check_hub(repo_id: str, what: str) -> None:
    """A hub id must be in the local cache or on a reachable hub."""
    if _in_cache(repo_id):
        return
    if _offline():
        raise InputError(f"{repo_id!r} is not in the local Hugging Face cache and the hub is off "
                         "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); pass a local folder", field=f"--{what}")
    if not _hub_reachable(repo_id):
        raise InputError(f"{repo_id!r} could not be reached: the Hugging Face hub does not answer "
                         "from this machine; pass a local folder (or a short name: see teachdiag.demo.zoo)",
                         field=f"--{what}")


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


def _reload_from_file(tok, path: str):
    """The tokenizer its tokenizer.json describes, when transformers re-built it as another kind.

    transformers 5.x picks the class from the model's config and tokenizer_config.json, and some
    classes rebuild the pipeline from their own code: a word-level tokenizer.json next to a Qwen2
    config comes back as a BPE `Qwen2Tokenizer` (gaining an <|endoftext|> token), and Qwen's BPE
    files whose tokenizer_config names GPT2Tokenizer come back, next to a Qwen3 config, with GPT-2's
    pre-tokenizer, which splits code differently. The files win: when the loaded tokenizer's model
    kind or its split of the probe texts differs from tokenizer.json's own, it is loaded from the file.
    """
    file = Path(path) / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)
    if not file.is_file() or backend is None:
        return tok
    from tokenizers import Tokenizer

    try:
        written = Tokenizer.from_file(str(file))
    except Exception:  # a file the tokenizers library cannot read: transformers' loading stands
        return tok
    same = type(written.model) is type(backend.model) and all(
        written.encode(text, add_special_tokens=False).ids == backend.encode(text, add_special_tokens=False).ids
        for text in PROBE_TEXTS)
    if same:
        return tok
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def load_tokenizer(name_or_path: str, what: str = "student", trust_remote_code: bool = False,
                   base: str = ""):
    """The model's tokenizer (fast when available), as its tokenizer files define it.

    An adapter folder without tokenizer files uses its base model's tokenizer."""
    from transformers import AutoTokenizer

    path = _check_exists(name_or_path, what)
    if is_adapter(path) and not (Path(path) / "tokenizer_config.json").is_file():
        path = _check_exists(adapter_base(path, base, what), f"{what}-base")
    _refuse_remote_code(path, what, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return _reload_from_file(tok, path)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise InputError(f"cannot load tokenizer of {path!r}: {_first_line(exc)}",
                         field=f"--{what}") from None


def _hub_folder(repo_id: str) -> str | None:
    """The cached snapshot a hub id was loaded from (for the weights hash), if any."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def load_model(name_or_path: str, what: str = "student", dtype: str = "float32",
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               device_map: str | None = None, base: str = ""):
    """A causal LM in eval mode on `device`, weights in `dtype`.

    device_map="auto" lets accelerate spread the model over the visible GPUs (then CPU), for a
    teacher too big for one GPU; `device` is ignored then. Only the teacher: the student is
    stepped in float32 and must sit on one device with its gradient and a copy of θ0.
    A PEFT adapter folder loads its base (`base`, else adapter_config.json's) and merges the
    adapter in. `model.teachdiag_source` records where the weights came from (provenance.py).
    """
    path = _check_exists(name_or_path, what)
    if is_adapter(path):
        weights = adapter_weights(path, what)
        base_name = adapter_base(path, base, what)
        base_model = load_model(base_name, f"{what}-base", dtype, "cpu" if device_map else device,
                                trust_remote_code, device_map)
        model = merge_adapter(base_model, path, what)
        base_source = getattr(base_model, "teachdiag_source", {})
        model.teachdiag_source = {"path": path, "weights_dir": None,
                                  "adapter": {"path": path, "weights": str(weights), "base": base_name,
                                              "base_dir": base_source.get("weights_dir")}}
        model.eval()
        model.requires_grad_(False)
        return model
    model = _from_pretrained(path, what, dtype, trust_remote_code, device_map)
    model.teachdiag_source = {"path": path, "weights_dir": path if Path(path).is_dir() else _hub_folder(path)}
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _require_safetensors(path: str, what: str) -> None:
    """A local folder must hold safetensors weights: any other weight file would be unpickled."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    why = f"; {pickled[0]} is pickled and never loaded" if pickled else ""
    raise InputError(f"no safetensors weights (model.safetensors){why}", file=str(folder), field=f"--{what}")


def _from_pretrained(path: str, what: str, dtype: str, trust_remote_code: bool, device_map: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    _refuse_remote_code(path, what, trust_remote_code)
    _require_safetensors(path, what)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "auto_map", None) and not trust_remote_code:  # hub ids: same rule as folders
            raise InputError(f"its config {REMOTE_CODE}", field=f"--{what}")
        # safetensors only: a pytorch_model.bin would be unpickled
        return AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            use_safetensors=True, **({"device_map": device_map} if device_map else {}))
    except InputError:
        raise
    except Exception as exc:
        msg = _first_line(exc)
        if "trust_remote_code" in str(exc):
            msg = f"its config {REMOTE_CODE}"
        raise InputError(f"cannot load model {path!r}: {msg}", field=f"--{what}") from None


def load_inputs(cfg) -> tuple[list[Context], object, TokenizerMatch]:
    """(contexts as token ids, student tokenizer, how the teacher's tokenizer matches it).

    Refuses a pair whose regular vocabularies differ; a pair that differs only in added/special
    tokens runs over the ids both agree on unless cfg.strict_tokenizer (tokenizers.py).
    `cfg`: a ProbeConfig or anything with the same model/contexts fields."""
    # no contexts file: the caller makes its own contexts (teachdiag train --on-policy)
    ctxs = load_contexts(cfg.contexts, cfg.max_response_tokens or None) if cfg.contexts else []
    s_tok = load_tokenizer(cfg.student, "student", cfg.trust_remote_code, cfg.student_base)
    t_tok = load_tokenizer(cfg.teacher, "teacher", cfg.trust_remote_code, cfg.teacher_base)
    match = compare_tokenizers(t_tok, s_tok, cfg.teacher, cfg.student, strict=cfg.strict_tokenizer)
    check_top_k(getattr(cfg, "top_k", None), match)
    ctxs = tokenize_text_records(ctxs, s_tok, cfg.max_response_tokens or None, raw=cfg.raw_text)
    return ctxs, s_tok, match


def check_top_k(top_k: int | None, match: TokenizerMatch) -> None:
    """--top-k must leave ids outside the top-K: a top-K of every id the pair shares makes compat_mass
    1.0 and topk_entropy the full entropy everywhere. Here, where the tokenizers first give the
    vocabulary, so every command with a --top-k (probe, calibrate, viability, train) refuses it before
    a model loads."""
    n_ids = match.vocab if match.shared_ids is None else len(match.shared_ids)
    if top_k is not None and top_k >= n_ids:
        raise InputError(f"must be below the vocabulary ({n_ids} ids), got {top_k}: a top-K of every id "
                         "makes compat_mass 1 everywhere", field="--top-k")


def load_models(cfg, device: torch.device, ctxs: list[Context], vocab: int):
    """(teacher, student), the student in float32 on `device`; checks vocabularies and lengths."""
    teacher = load_model(cfg.teacher, "teacher", cfg.dtype, device, cfg.trust_remote_code,
                         device_map=getattr(cfg, "teacher_device_map", "") or None, base=cfg.teacher_base)
    student = load_model(cfg.student, "student", "float32", device, cfg.trust_remote_code,
                         base=cfg.student_base)
    for who, model in (("teacher", teacher), ("student", student)):
        if vocab > vocab_rows(model):
            raise InputError(f"tokenizer has {vocab} tokens but the {who} has only {vocab_rows(model)} "
                             "output rows", field=f"--{who}")
    max_pos = min(getattr(m.config, "max_position_embeddings", None) or 10**9 for m in (teacher, student))
    check_token_ids(ctxs, vocab, max_pos)
    return teacher, student
