"""Writes that survive a kill or a power cut: flushed and fsynced files, renames made durable.

    from teachdiag.durable import _atomic_write, _fsync_write, _fsync_dir
    _fsync_write(path, text)      # appended (mode "a"), on disk when it returns; text or bytes
    _atomic_write(path, text)     # whole: written beside as <name>.tmp, fsynced, renamed into place
    _fsync_dir(folder)            # a rename or a new file in folder made durable

Commands never call these: they write through the run output (runfolder.RunOutput), which adds
the lock, the run record and one-line errors. The shared step's gradient file (probe/stepfile.py),
a library-internal resume file, uses _fsync_dir directly; this module sits below both.
"""

from __future__ import annotations

import os
from pathlib import Path


def _fsync_write(path: Path, text: str | bytes, mode: str = "a") -> None:
    # bytes (a rendered figure) are written as they are; text as UTF-8 with its own line ends
    binary = isinstance(text, bytes)
    with open(path, mode + "b" if binary else mode, **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
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


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _fsync_write(tmp, text, mode="w")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
