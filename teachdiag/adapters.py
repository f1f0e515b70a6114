"""PEFT adapter folders as models: resolve the base, load it, merge the adapter into it.

    from teachdiag.adapters import is_adapter, adapter_base, merge_adapter
    if is_adapter("runs/lora-step-400"):
        base = adapter_base("runs/lora-step-400", override="")   # adapter_config.json's base
        model = merge_adapter(base_model, "runs/lora-step-400")  # plain model, adapter merged

Why merge: the probe steps the student's own float32 weights; with the adapter merged
(merge_and_unload) a step touches W + BA as one matrix, the weights a full fine-tune would hold,
and every probe path works unchanged. Needs the optional `peft` (pip install teachdiag[adapters]).
Only safetensors adapters are loaded: an adapter_model.bin would be unpickled, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from teachdiag.errors import InputError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
INSTALL = "pip install teachdiag[adapters]"


def is_adapter(path: str) -> bool:
    """A local folder holding adapter_config.json."""
    return (Path(path) / CONFIG).is_file()


def adapter_base(path: str, override: str, what: str) -> str:
    """The base model of an adapter: `override` (--<what>-base) if given, else its config's."""
    cfg_path = Path(path) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("is not valid JSON", file=str(cfg_path), field=f"--{what}") from None
    base = override or (cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None)
    if not base:
        raise InputError(f"names no base_model_name_or_path; pass --{what}-base", file=str(cfg_path),
                         field=f"--{what}")
    return str(base)


def adapter_weights(path: str, what: str) -> Path:
    """The adapter's safetensors file (a pickled adapter_model.bin is refused)."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        found = "adapter_model.bin is pickled and never loaded" if (Path(path) / "adapter_model.bin").exists() \
            else "not found"
        raise InputError(f"{WEIGHTS} {found}; save the adapter with safe_serialization", file=str(path),
                         field=f"--{what}")
    return weights


def merge_adapter(base_model, path: str, what: str):
    """The base model with the adapter at `path` merged into its weights (a plain transformers model)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError(f"is a PEFT adapter folder and peft is not installed: {INSTALL}", file=str(path),
                         field=f"--{what}") from None
    adapter_weights(path, what)
    try:
        merged = PeftModel.from_pretrained(base_model, path, is_trainable=False).merge_and_unload()
    except Exception as exc:  # peft raises many types (shape mismatch, unknown modules): one line
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise InputError(f"cannot apply the adapter to its base: {first}", file=str(path),
                         field=f"--{what}") from None
    return merged
