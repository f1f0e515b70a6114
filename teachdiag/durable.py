"""Writes that survive a kill or a power cut: flushed and fsynced files, renames made durable.

    from teachdiag.durable import _atomic_write, _fsync_write, _fsync_dir
    _fsync_write(path, text)      # appended (mode "a"), on disk when it returns
    _atomic_write(path, text)     # whole: written beside as <name>.tmp, fsynced, renamed into place
    _fsync_dir(folder)            # a rename or a new file in folder made durable

The run folder (runfolder.py) and the shared step's gradient file (probe/stepfile.py) both write
this way; it sits below both in the chain of imports.
"""

from __future__ import annotations

import os
from pathlib import Path


def _fsync_write(path: Path, text: str, mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _fsync_write(tmp, text, mode="w")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
