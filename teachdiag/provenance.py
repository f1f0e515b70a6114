"""What a run record says about each model: which bytes, in which dtype on disk, by which code.

    from teachdiag.provenance import model_record, weights_summary, code_version
    rec = model_record("path/to/student", student, "float32")   # run.json's "student" entry
    weights_summary("path/to/folder")   # {"files", "sha256", "source_dtype", "source_dtypes"}
    code_version()                      # {"version": "0.1.0", "git_commit": "ab12..." | None}
    command_header("rollout", argv, options, device)   # command line, options, device: every record's opening

Why: a bfloat16 folder is upcast to float32 for stepping, and the config hash alone cannot tell it
from the float32 folder it came from; the weights hash and the dtype on disk can. Only
safetensors headers are read for the dtype (8-byte length + JSON); weight files are hashed as
bytes, streamed, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

from teachdiag import __version__

# safetensors dtype codes -> torch names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# what identifies a model's weights in its run-record entry (model_record): a resumed run must match
WEIGHT_KEYS = ("config_sha256", "weights_sha256", "adapter")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder (safetensors shards and their index, or a GGUF), sorted."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    files += [p for p in folder.glob("*.safetensors.index.json")]
    return sorted(files, key=lambda p: p.name)


def safetensors_dtypes(path: str | Path) -> dict[str, int]:
    """{torch dtype name: number of elements} from a safetensors header, without loading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out: dict[str, int] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in t["shape"]:
            count *= d
        key = _ST_DTYPES.get(t["dtype"], t["dtype"].lower())
        out[key] = out.get(key, 0) + count
    return out


def weights_summary(folder: str) -> dict:
    """Files, one sha256 over them (name + bytes of each, in name order), and the dtype on disk.

    Hashed once per state of the files: the cache is keyed by each weight file's name, size,
    inode and modification time too, so a folder saved again in place (a notebook that trains
    and re-probes) is hashed afresh, never given its old weights' hash."""
    stamp = tuple((p.name, st.st_size, st.st_ino, st.st_mtime_ns) for p in weight_files(folder)
                  for st in [p.stat()])
    return _weights_summary(folder, stamp)


@lru_cache(maxsize=16)
def _weights_summary(folder: str, stamp: tuple) -> dict:
    files = weight_files(folder)
    h = hashlib.sha256()
    dtypes: dict[str, int] = {}
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
        if p.name.endswith(".safetensors"):
            for k, v in safetensors_dtypes(p).items():
                dtypes[k] = dtypes.get(k, 0) + v
    return {"files": [p.name for p in files], "sha256": h.hexdigest() if files else None,
            # the dtype most elements are stored in (norms are sometimes kept in float32)
            "source_dtype": max(dtypes, key=dtypes.get) if dtypes else None,
            "source_dtypes": dtypes}


@lru_cache(maxsize=1)
def code_version() -> dict:
    """teachdiag's version and, when run from a git checkout, its commit (with '+dirty' if edited)."""
    root = Path(__file__).resolve().parent.parent
    commit = None
    if (root / ".git").exists():
        try:
            run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True,  # noqa: E731
                                            text=True, timeout=5)
            head = run("rev-parse", "HEAD")
            if head.returncode == 0:
                commit = head.stdout.strip()
                dirty = run("status", "--porcelain", "--untracked-files=no", "--", "teachdiag")
                commit += "+dirty" if dirty.stdout.strip() else ""
        except (OSError, subprocess.TimeoutExpired):
            commit = None
    return {"version": __version__, "git_commit": commit}


def vocab_rows(model) -> int:
    """Rows of the output embedding (may exceed the tokenizer: padded vocabularies)."""
    return int(model.get_output_embeddings().weight.shape[0])


def config_sha256(model) -> str:
    """Hash of the full model config, so run.json pins the architecture."""
    text = model.config.to_json_string(use_diff=False)
    # the dtype and the local path are not part of the architecture
    cfg = {k: v for k, v in json.loads(text).items() if k not in ("dtype", "torch_dtype", "_name_or_path")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def model_record(name: str, model, dtype_used: str) -> dict:
    """run.json's entry for one model: what was asked for, which files, their dtype and hash.

    `model.teachdiag_source` (set by models.load_model) gives the folder the weights came from
    and, for a PEFT adapter, the base folder; a model built otherwise records no file hashes.
    """

    source = getattr(model, "teachdiag_source", None) or {}
    rec = {"name": name, "path": source.get("path"), "class": type(model).__name__,
           "config_sha256": config_sha256(model), "vocab_rows": vocab_rows(model), "dtype": dtype_used,
           "n_params": sum(p.numel() for p in model.parameters()),
           "tied_embeddings": model.get_output_embeddings().weight is model.get_input_embeddings().weight}
    weights_dir = source.get("weights_dir")
    w = weights_summary(str(weights_dir)) if weights_dir else {}
    rec.update(weights_sha256=w.get("sha256"), weight_files=w.get("files"),
               source_dtype=w.get("source_dtype"), upcast=bool(w.get("source_dtype")) and w.get("source_dtype") != dtype_used)
    adapter = source.get("adapter")
    if adapter:
        base = weights_summary(str(adapter["base_dir"])) if adapter.get("base_dir") else {}
        rec["adapter"] = {"path": adapter["path"], "sha256": file_sha256(adapter["weights"]),
                          "base": adapter["base"], "base_weights_sha256": base.get("sha256"),
                          "base_source_dtype": base.get("source_dtype"), "merged": True}
        rec["source_dtype"] = base.get("source_dtype")
        rec["upcast"] = bool(rec["source_dtype"]) and rec["source_dtype"] != dtype_used
    rec["teachdiag"] = code_version()
    return rec


def command_header(command: str, argv: list[str] | None, options: dict, device) -> dict:
    """The fields every run record opens with, whatever models the command loads: the command line,
    options and device (run_header adds the pair's; rollout adds its one student's model_record)."""
    import sys

    import torch

    return {
        "command": " ".join(["teachdiag", command, *(argv if argv is not None else sys.argv[2:])]),
        "options": options, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU, {torch.get_num_threads()} torch threads"),
    }


def run_header(command: str, argv: list[str] | None, options: dict, device, cfg, teacher, student, match,
               ctxs: list) -> dict:
    """The fields every command's run.json opens with: the command line, options, device, both models,
    the tokenizer match and the contexts file (probe and viability add their own after these)."""
    from teachdiag.contexts import encoding_summary

    return {
        **command_header(command, argv, options, device),
        "teacher": model_record(cfg.teacher, teacher, cfg.dtype),
        "student": model_record(cfg.student, student, "float32"),
        "tokenizer": match.record(),
        # none with `train --on-policy`, which samples its own from --prompts
        "contexts": {"path": str(cfg.contexts), "sha256": file_sha256(cfg.contexts), "n_contexts": len(ctxs),
                     "encoding": encoding_summary(ctxs)} if cfg.contexts else None,
    }
