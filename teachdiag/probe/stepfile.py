"""A shared step saved for --resume: ∇L and the signals at θ0, one safetensors file in the run folder.

    from teachdiag.probe.stepfile import save_tensors, read_header, load_tensors, check_free_space
    check_free_space(folder, nbytes)                      # InputError (one line) if the disk is too full
    save_tensors(path, {"grad.lm_head.weight": g, ...}, {"contexts": "[0, 1]"})   # atomic, fsynced
    header = read_header(path)                            # {name: (dtype, shape)}, metadata; None if unusable
    tensors = load_tensors(path, device)

With `--shared-batch 0` the whole run's rows wait on one gradient, and θ1 = θ0 − lr·scale·d(∇L) can be
rebuilt from ∇L alone: saving it (4 bytes per stepped parameter, 2.0 GB for a 0.5B student) lets an
interrupted run write the rest of its rows without a second pass over every context.

The file is standard safetensors (safetensors.torch.load_file reads it), but written and read here
tensor by tensor: safetensors' own save_file first turns every tensor into bytes, a second copy of
∇L in memory, which is what the shared step's 8 bytes per parameter leave no room for. Written to
<name>.tmp, fsynced, renamed, the folder fsynced: a kill leaves the old state or the new, never half.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from teachdiag.durable import _fsync_dir
from teachdiag.errors import InputError

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.uint8: "U8", torch.int64: "I64"}
BY_NAME = {v: k for k, v in DTYPES.items()}
MARGIN = 64 * 2**20  # room left for the rows written beside the file


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_free_space(folder: Path, need: int, what: str = "the shared step's gradient, kept for --resume") -> None:
    """One-line InputError unless `folder` has `need` bytes free (plus a margin) before any work starts."""
    free = shutil.disk_usage(folder).free
    if free < need + MARGIN:
        raise InputError(f"needs {need / 1e9:.2f} GB free for {what}, has {free / 1e9:.2f} GB; free space or "
                         "choose another --out", file=str(folder), field="--out")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (contiguous; dtypes of DTYPES) and string `metadata` as safetensors, atomically.
    A failing write (a full disk) is one line naming the file; the half-written .tmp is removed."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.numel()
                                                                                           * t.element_size()]}
        offset += t.numel() * t.element_size()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for t in tensors.values():  # one tensor on the host at a time, written from its own memory
                f.write(t.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write ({exc.strerror or exc}); the finished rows are kept; free space or fix "
                         "permissions, then rerun with --resume", file=str(path), field="--out") from None


def read_header(path: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str], int] | None:
    """({name: (dtype, shape)}, metadata, data start) of a file save_tensors wrote, or None when it is
    missing or not a whole file of that layout (then the step is computed again)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 * 2**20):
                return None
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {})
        entries, end = {}, 0
        for name, e in header.items():
            dtype, shape, (a, b) = BY_NAME[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            if a != end or b - a != int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size():
                return None
            entries[name], end = (dtype, shape), b
        return (entries, meta, 8 + n) if 8 + n + end == size else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def load_tensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor] | None:
    """Every tensor of the file, read straight into its own memory (no memory map), moved to `device`."""
    got = read_header(path)
    if got is None:
        return None
    entries, _, start = got
    out = {}
    with open(path, "rb") as f:
        f.seek(start)
        for name, (dtype, shape) in entries.items():
            t = torch.empty(shape, dtype=dtype)
            if f.readinto(t.numpy().reshape(-1).view(np.uint8)) != t.numel() * t.element_size():
                return None
            out[name] = t.to(device)
    return out
