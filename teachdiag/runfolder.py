"""The run folder: tokens.csv (one row per probed position) and run.json (the run record).

    from teachdiag.runfolder import RunWriter
    w = RunWriter("runs/r1", overwrite=False)
    w.start(record)                 # run.json with "complete": false
    w.append_context("ctx-1", rows) # appended, flushed and fsynced: a killed run keeps it
    df = w.finish(record, order)    # tokens.csv with teachability/incompat, "complete": true

Rows are first appended to tokens.partial.csv, one write per finished context, and the byte
length after each context goes to progress.jsonl; a crash can only tear the last context, which
resume cuts off. tokens.csv appears only when the run is complete, because teachability and
incompat are normalised over all rows of the run and would change with more rows.
Under torchrun each rank appends to its own part (tokens.partial.rank<r>.csv, progress.rank<r>.jsonl)
and rank 0 merges every part, in the single-process order, into tokens.csv.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from teachdiag.durable import _atomic_write, _fsync_dir, _fsync_write  # noqa: F401  (callers import them from here too)
from teachdiag.errors import InputError
from teachdiag.provenance import WEIGHT_KEYS
from teachdiag.scores import teachability_columns
from teachdiag.table import COLUMNS, RUN, TEXT_COLUMNS, TOKENS, all_parts, part_files, read_tokens, rows_to_csv


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder in it (files written by other code, e.g.
    save_pretrained, before the folder is published)."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(Path(root))
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(folders):
        _fsync_dir(d)


def discard_tree(folder: Path) -> None:
    """Remove a folder so that a kill midway never leaves it half-deleted under its own name
    (where it could pass for a complete one): renamed to <name>.trash first, then deleted."""
    trash = folder.with_name(folder.name + ".trash")
    if folder.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_folder(tmp: Path, final: Path) -> None:
    """Replace folder `final` by the complete folder `tmp`, the folder version of _atomic_write.

    A directory cannot be renamed over a non-empty one, so there are two renames (final ->
    final.old, tmp -> final); a kill between them leaves no `final` but both complete folders,
    tmp and final.old, under their own names: the caller's resume picks the newer one
    (e.g. train.recover_checkpoint). Everything in tmp is fsynced before the first rename."""
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        discard_tree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    discard_tree(old)



@contextmanager
def disk_faults(where: Path, kept: str = "what was finished is kept; free space or fix permissions, then rerun "
                                          "with --resume"):
    """Turn a failing write (disk full, a folder turned read-only, a vanished mount) into one line
    naming the file and what survived, instead of a traceback: the environment, not a bug."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"cannot write ({exc.strerror or exc}); {kept}", file=str(exc.filename or where),
                         field="--out") from None


def check_writable(folder: Path, name: str = ".write-test", field: str = "--out") -> None:
    """Make `folder` and write a file in it now, so a read-only or full place is refused before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write there ({exc.strerror or exc})", field=field, file=str(folder)) from None


LOCK = ".teachdiag.lock"  # in a folder some teachdiag process is writing; the flock on it is what counts
_held: dict[tuple[int, int], object] = {}  # (device, inode) of a lock file -> its open file, while held


def lock_folder(folder: Path, field: str = "--out", name: str = LOCK) -> None:
    """Make this process the only teachdiag writer of `folder` (or, with `name`, of one output in it:
    rollout locks folder/.<file>.lock): an exclusive flock on
    folder/.teachdiag.lock, held until release_locks() (a command's end) or the process's end; the
    OS releases it when the process dies, so a kill -9 leaves no stale lock (the file stays and
    means nothing). Taken again by this process (even after the folder was renamed): a no-op.
    Held by another process: an InputError naming its pid. Where the file system has no locks,
    nothing is locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    f = open(Path(folder) / name, "a+", encoding="utf-8")
    st = os.fstat(f.fileno())
    if (st.st_dev, st.st_ino) in _held:  # flock would refuse this process its own lock through a new file
        f.close()
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        what = "folder" if name == LOCK else "file"
        raise InputError(f"another teachdiag process (pid {holder}) is writing to this {what}; wait for it "
                         "to end (or stop it, then --resume)", field=field,
                         file=str(folder if name == LOCK else Path(folder) / name[1:-len(".lock")])) from None
    except OSError:  # no locks on this file system (ENOLCK, EINVAL)
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[(st.st_dev, st.st_ino)] = f


def release_locks() -> None:
    """Let go of every folder this process locked: called when a command ends, so a notebook that
    ran one does not keep its folder from the next."""
    while _held:
        _held.popitem()[1].close()


def releases_locks(command):
    """Decorator for a command's run function: the folder locks it takes (lock_folder) are let go
    when it returns or raises, however it ends."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        finally:
            release_locks()
    return run


def claim_folder(out: Path, overwrite: bool, resume: bool, rank: int = 0) -> None:
    """Make `out` this command's output folder, or say why not: not a file, writable now, locked
    against another run (rank 0), and empty unless --overwrite or --resume. Every command that
    writes a run folder (probe, viability, train) claims it this way, before reading anything in it."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", field="--out", file=str(out))
    existed = out.is_dir()
    check_writable(out, f".write-test.{rank}")
    if rank == 0:  # before anything is read: another run in this folder is refused by name
        lock_folder(out)
    # other ranks may be writing their test files right now: those do not make it non-empty
    occupied = existed and any(not p.name.startswith((".write-test", LOCK)) for p in out.iterdir())
    if occupied and not (overwrite or resume):
        raise InputError("folder is not empty; pass --overwrite to replace it or --resume to "
                         "continue it", field="--out", file=str(out))


class RunWriter:
    """Owns one run folder (one rank's part of it); see the module docstring for the files."""

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, rank: int = 0,
                 columns: list[str] = COLUMNS, text_columns: tuple[str, ...] = TEXT_COLUMNS,
                 table: str = TOKENS, key: tuple[str, ...] = ("context_id", "position")) -> None:
        """columns/text_columns/table/key: tokens.csv's by default; `teachdiag viability` writes
        viability.csv (one row per position and alternative) through the same machinery."""
        self.out, self.rank = Path(out), rank
        self.columns, self.text_columns, self.table, self.key = columns, text_columns, table, list(key)
        claim_folder(self.out, overwrite, resume, rank)
        self.fresh = overwrite and not resume  # old files go in start(), once the models have loaded
        self.partial, self.progress = part_files(self.out, rank)

    def repair(self, own_only: bool = False) -> None:
        """Cut a torn last write off every part (rank 0, before any rank reads done_contexts),
        or off this rank's own part (after Ctrl-C, which can land between its two writes)."""
        with disk_faults(self.out):
            self._repair(own_only)

    def _repair(self, own_only: bool) -> None:
        seen: set[str] = set()  # a context found in an earlier part is not taken twice
        for partial, progress in [(self.partial, self.progress)] if own_only else all_parts(self.out):
            # no progress file: killed before its first context was recorded, so nothing counts
            entries = _progress_entries(progress) if progress.exists() else []
            data = partial.read_bytes() if partial.exists() else b""
            entries = self._whole_contexts(data, entries, seen)
            if partial.exists():  # never past its end (that would pad it with NUL bytes)
                with open(partial, "r+b") as f:
                    f.truncate(entries[-1]["bytes"] if entries else 0)
            _atomic_write(progress, "".join(json.dumps(e) + "\n" for e in entries))

    def _whole_contexts(self, data: bytes, entries: list[dict], seen: set[str]) -> list[dict]:
        """The progress entries whose rows are really in `data` (a part's bytes), up to the first that
        is not: its byte range must lie in the file, end a line, and hold rows of this table's columns,
        all of that context and none twice. A damaged part (cut short, a row doubled, a context written
        twice) is cut back to its last sound context, and what follows is computed again."""
        header = (",".join(self.columns) + "\n").encode()
        at_key, at_id = [self.columns.index(k) for k in self.key], self.columns.index("context_id")
        keys: set[tuple] = set()
        good, start = [], len(header)
        if not data.startswith(header):
            return []
        for e in entries:
            end = e.get("bytes") if isinstance(e, dict) else None
            cid = e.get("id") if isinstance(e, dict) else None
            if not (isinstance(end, int) and isinstance(cid, str) and start < end <= len(data)) or cid in seen:
                break
            segment = data[start:end]
            try:
                rows = list(csv.reader(io.StringIO(segment.decode("utf-8"), newline="")))
            except (UnicodeDecodeError, csv.Error):
                break
            here = {tuple(r[i] for i in at_key) for r in rows if len(r) == len(self.columns)}
            if (not segment.endswith(b"\n") or not rows or len(here) < len(rows) or here & keys
                    or any(len(r) != len(self.columns) or r[at_id] != cid for r in rows)):
                break
            keys |= here
            seen.add(cid)
            good.append(e)
            start = end
        return good

    def done_contexts(self) -> set[str]:
        """Contexts finished by an earlier, interrupted run, on any rank (after repair())."""
        return {e["id"] for _, progress in all_parts(self.out) if progress.exists()
                for e in _progress_entries(progress)}

    def start(self, record: dict) -> None:
        """Rank 0: clear an --overwrite folder and write run.json with "complete": false."""
        with disk_faults(self.out):
            if self.fresh:
                for partial, progress in all_parts(self.out):
                    partial.unlink(missing_ok=True)
                    progress.unlink(missing_ok=True)
                (self.out / self.table).unlink(missing_ok=True)
                (self.out / RUN).unlink(missing_ok=True)
            self.write_record(dict(record, complete=False))

    def check_resume(self, record: dict, same_options: tuple[str, ...],
                     models: Callable[[dict], dict] = lambda r: {"teacher": r["teacher"], "student": r["student"]},
                     added: dict | None = None) -> None:
        """Refuse to --resume this folder into `record` unless it is an unfinished run of the same work:
        the options in `same_options`, the models' weights (`models`: name -> run-record entry, or None
        where a run has no such model), the contexts file and the table's columns all unchanged.
        added: options newer than some run records, with the value those runs had."""
        old_path = self.out / RUN
        if not old_path.exists():
            raise InputError("nothing to resume (no run.json)", field="--resume", file=str(self.out))
        try:
            old = json.loads(old_path.read_text())
            old["options"], old["contexts"], models(old)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise InputError("is not a teachdiag run record", field="--resume", file=str(old_path)) from None
        for key in same_options:
            was = old["options"].get(key, (added or {}).get(key))
            if was != record["options"].get(key):
                raise InputError(f"option {key} differs from the run being resumed "
                                 f"({was!r} vs {record['options'].get(key)!r})",
                                 field="--resume", file=str(old_path))
        before, now = models(old), models(record)
        for who in now:
            a, b = before.get(who), now[who]
            if a is not None and b is not None and any(a.get(k) != b.get(k) for k in WEIGHT_KEYS):
                raise InputError(f"the {who} model differs from the run being resumed", field="--resume",
                                 file=str(old_path))
        if old["contexts"]["sha256"] != record["contexts"]["sha256"]:
            raise InputError("the contexts file changed since the run began", field="--resume", file=str(old_path))
        for partial, _ in all_parts(self.out):  # a part written by another version of the table
            if partial.is_file() and partial.stat().st_size > 0:
                with open(partial, encoding="utf-8", errors="replace") as f:
                    if f.readline().rstrip("\n") != ",".join(self.columns):
                        raise InputError("its columns differ from this version's; start a new run",
                                         field="--resume", file=str(partial))
        if old.get("complete") is True:
            raise InputError("this run is already complete; nothing to resume", field="--resume",
                             file=str(old_path))

    def write_record(self, record: dict) -> None:
        with disk_faults(self.out):
            _atomic_write(self.out / RUN, json.dumps(record, indent=2, default=str) + "\n")

    def append_context(self, context_id: str, rows: list[dict]) -> None:
        with disk_faults(self.out):  # a torn write here is cut off by the next resume's repair()
            header = not self.partial.exists() or self.partial.stat().st_size == 0
            _fsync_write(self.partial, rows_to_csv(rows, header=header, columns=self.columns))
            _fsync_write(self.progress, json.dumps({"id": context_id, "bytes": self.partial.stat().st_size}) + "\n")

    def merged_rows(self, order: list[str]) -> pd.DataFrame:
        """Every part's rows, contexts in `order` (the single-process order), each exactly once."""
        parts = [read_tokens(p, self.columns, self.text_columns) for p, _ in all_parts(self.out)
                 if p.exists() and p.stat().st_size > 0]
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=self.columns)
        rank = {cid: i for i, cid in enumerate(order)}
        found = df.groupby("context_id", sort=False).size().index
        missing, extra = set(order) - set(found), set(found) - set(order)
        if missing or extra:  # never write a table that looks finished but is not this run's
            raise RuntimeError(f"run parts do not match the run: {len(missing)} contexts missing, "
                               f"{len(extra)} unexpected, in {self.out}")
        if df.duplicated(self.key).any():
            raise RuntimeError(f"a row ({', '.join(self.key)}) appears twice in the run parts in {self.out}")
        # stable sort: within a context the rows keep their probe order (positions ascending)
        return df.sort_values("context_id", key=lambda c: c.map(rank), kind="stable").reset_index(drop=True)

    def finish(self, record: dict, order: list[str]) -> pd.DataFrame:
        """Merge the parts, normalise teachability/incompat over all rows, write tokens.csv, mark complete.

        `order`: every context id of the run in single-process order.
        """
        df = self.merged_rows(order)
        df["teachability"], df["incompat"] = teachability_columns(df["union_fkl"], df["compat_mass"],
                                                                  df["finite"].to_numpy() == 1)
        return self.finish_table(record, df)

    def finish_table(self, record: dict, df: pd.DataFrame) -> pd.DataFrame:
        """Write the finished table (all of self.columns) atomically, mark run.json complete and
        remove the parts."""
        rows = df.to_dict("records")
        for r in rows:  # pandas gives numpy scalars; CSV writing wants plain floats and ints
            for c in self.columns:
                v = r[c]
                r[c] = float(v) if isinstance(v, (float, np.floating)) else v
        table = self.out / self.table
        try:
            with disk_faults(self.out, "every part is kept; free space or fix permissions, then rerun with "
                                       "--resume to merge them"):
                _atomic_write(table, rows_to_csv(rows, header=True, columns=self.columns))
        except InputError:
            try:
                table.with_name(table.name + ".tmp").unlink(missing_ok=True)  # half a table helps no one
            except OSError:
                pass
            raise
        self.write_record(dict(record, complete=True))
        for partial, progress in all_parts(self.out):
            partial.unlink(missing_ok=True)
            progress.unlink(missing_ok=True)
        return df


def _progress_entries(progress: Path) -> list[dict]:
    """The finished-context entries of one progress file, up to a torn line."""
    entries = []
    for line in progress.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn progress line: the context it describes is redone
    return entries
