"""The run output: one writer through which every command writes what it leaves on disk.

    from teachdiag.runfolder import RunOutput
    out = RunOutput("runs/r1", record="run.json", overwrite=False, resume=False)  # claimed and locked
    out.start(header)                    # the run record, "complete": false, before any work
    out.append("log.csv", line)          # appended, flushed and fsynced: a killed run keeps it
    out.cut("log.csv", n_bytes)          # a resume cuts a torn tail back to what is whole
    out.write("table.csv", text)         # whole: <name>.tmp, fsynced, renamed into place
    out.publish(tmp_folder, "model")     # a folder swapped in whole (train's checkpoint set)
    out.finish(record)                   # the run record again, "complete": true, last
    RunOutput.beside("r.jsonl", ".run.json")  # one file's output (rollout): r.jsonl.run.json, a lock of its own
    RunOutput.rewritten("runs/r1/analysis", "analysis.json")  # a folder rewritten in place (analyze)

Every write turns a failing disk (full, read-only, gone) into one line naming the file and what
survived (disk_faults), instead of a traceback. The record is the run header (provenance: command
line, options, device, models with their weight hashes) plus what the command adds; it is written
atomically, so a reader sees the old record or the new one, never half of one, and a record that
says "complete": false (or none at all) means the other files are not to be trusted as finished.
probe and viability write their tables through the table layer on top of this (runtable.py);
train, rollout, calibrate and analyze use it directly. Only this module calls the durable.py primitives
for a command (tests/test_layout.py holds every command to that).

Also here: claim_folder and lock_folder (one writer per folder or file, by flock), check_writable,
publish_folder / discard_tree / fsync_tree (folders replaced or removed so that a kill leaves a
complete one), releases_locks (a command's locks end with it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

# looked up here at each call (not bound in the writer), so a test can fail a write on purpose
from teachdiag.durable import _atomic_write, _fsync_dir, _fsync_write
from teachdiag.errors import InputError
from teachdiag.provenance import WEIGHT_KEYS


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



KEPT = "what was finished is kept; free space or fix permissions, then rerun with --resume"


@contextmanager
def disk_faults(where: Path, kept: str = KEPT):
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


class RunOutput:
    """Owns one command's output: a folder (claimed, locked) or one file in a folder (locked by
    name), its run record, and every write into it; see the module docstring."""

    def __init__(self, folder: str | Path, record: str = "run.json", *, overwrite: bool = False,
                 resume: bool = False, rank: int = 0, claim: bool = True) -> None:
        """claim: make `folder` this command's (claim_folder: a folder, writable, locked by rank 0,
        empty unless overwrite or resume). False: the caller has locked what it writes (beside())."""
        self.folder, self.record = Path(folder), record
        self.kept = KEPT  # what a failing write says survived (faults() changes it for a stretch of work)
        if claim:
            claim_folder(self.folder, overwrite, resume, rank)

    @classmethod
    def beside(cls, file: str | Path, suffix: str = ".run.json") -> "RunOutput":
        """The output of a command that writes one file (rollout): its folder made and checked
        writable, a lock of that file alone (<folder>/.<name>.lock, so two outputs in one folder do
        not exclude each other), and the record <name><suffix> beside it. Whether the file may be
        replaced or resumed is the command's to say: its format knows what a whole record is."""
        file = Path(file)
        check_writable(file.parent)
        lock_folder(file.parent, name=f".{file.name}.lock")  # before the file or its record is read
        return cls(file.parent, file.name + suffix, claim=False)

    @classmethod
    def rewritten(cls, folder: str | Path, record: str) -> "RunOutput":
        """The output of a command that rewrites its folder's files in place, whatever is there
        (analyze: each table replaced whole): made, checked writable and locked now, before any
        work, but not required empty; the record says "complete": false while it is rewritten."""
        folder = Path(folder)
        check_writable(folder)
        lock_folder(folder)
        return cls(folder, record, claim=False)

    def path(self, name: str | Path) -> Path:
        """Where `name` lives: a str is a name in the folder ("train_log.csv", "model/x.json"); a
        Path is taken as it is (the caller built it from the folder, e.g. a table's part files)."""
        return name if isinstance(name, Path) else self.folder / name

    def previous(self, field: str = "--resume") -> dict | None:
        """The run record already there (None when there is none); unreadable: one-line InputError."""
        path = self.path(self.record)
        if not path.is_file():
            return None
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise TypeError
            return old
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            raise InputError("is not a teachdiag run record", field=field, file=str(path)) from None

    def check_models(self, before: dict, now: dict) -> None:
        """Refuse to continue a run whose models' weights changed: `before` and `now` map a role
        (teacher, student) to its run-record entry (provenance.model_record), or None where a run
        has no such model; an entry is the same model when every WEIGHT_KEYS field is equal."""
        for who in now:
            a, b = before.get(who), now[who]
            if a is not None and b is not None and any(a.get(k) != b.get(k) for k in WEIGHT_KEYS):
                raise InputError(f"the {who} model differs from the run being resumed", field="--resume",
                                 file=str(self.path(self.record)))

    @contextmanager
    def faults(self, kept: str):
        """A stretch of work whose failing writes say `kept` survived: the writer's own, and any
        other code's in the block (e.g. save_pretrained writing a checkpoint) turned into one line too."""
        before, self.kept = self.kept, kept
        try:
            with disk_faults(self.folder, kept):
                yield
        finally:
            self.kept = before

    def write_record(self, record: dict, kept: str | None = None) -> None:
        """The run record as given, written whole (start and finish add "complete")."""
        self.write(self.record, json.dumps(record, indent=2, default=str) + "\n", kept)

    def start(self, record: dict, kept: str | None = None) -> None:
        """The run record with "complete": false: before the work, so a killed run says so."""
        self.write_record(dict(record, complete=False), kept)

    def finish(self, record: dict, kept: str | None = None) -> None:
        """The run record with "complete": true: the last write, once every other file is in place."""
        self.write_record(dict(record, complete=True), kept)

    def append(self, name: str | Path, text: str, kept: str | None = None) -> None:
        """Append to `name`, flushed and fsynced: on disk when it returns. A kill can tear only the
        last append, which the command's resume cuts off (cut)."""
        path = self.path(name)
        with disk_faults(path, kept or self.kept):
            _fsync_write(path, text)

    def write(self, name: str | Path, data: str | bytes, kept: str | None = None) -> None:
        """Replace `name` whole: written beside as <name>.tmp, fsynced, renamed into place. On a
        failing write the .tmp is removed (half a file helps no one) and `kept` says what survived."""
        path = self.path(name)
        try:
            with disk_faults(path, kept or self.kept):
                _atomic_write(path, data)
        except InputError:
            try:
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            except OSError:
                pass
            raise

    def cut(self, name: str | Path, length: int, kept: str | None = None) -> None:
        """Cut `name` back to its first `length` bytes (a torn tail), never past its end (that would
        pad it with NUL bytes); a file that is not there stays absent."""
        path = self.path(name)
        with disk_faults(path, kept or self.kept):
            if path.exists():
                with open(path, "r+b") as f:
                    f.truncate(min(length, os.fstat(f.fileno()).st_size))
                    os.fsync(f.fileno())

    def move(self, name: str | Path, to: str | Path, kept: str | None = None) -> None:
        """Rename `name` to `to` in the folder, durably."""
        src, dst = self.path(name), self.path(to)
        with disk_faults(src, kept or self.kept):
            os.replace(src, dst)
            _fsync_dir(dst.parent)

    def remove(self, *names: str | Path, kept: str | None = None) -> None:
        """Delete files (absent ones are fine) and folders (discard_tree: never half-deleted under their name)."""
        for name in names:
            path = self.path(name)
            with disk_faults(path, kept or self.kept):
                if path.is_dir() or path.with_name(path.name + ".trash").exists():  # and a killed removal's rest
                    discard_tree(path)
                else:
                    path.unlink(missing_ok=True)

    def publish(self, tmp: str | Path, name: str | Path, last: tuple[str, str] | None = None,
                kept: str | None = None) -> None:
        """Swap the complete folder `tmp` in as `name` (publish_folder: everything in it fsynced first;
        a kill between its two renames leaves two complete folders, <name>.old and tmp).
        last: (a path in tmp, its text), written whole after everything else in tmp is on disk, so its
        presence marks the folder complete (train's set record)."""
        src = self.path(tmp)
        with disk_faults(self.path(name), kept or self.kept):
            if last is not None:  # the rest on disk before the file that says it is complete
                fsync_tree(src)
                _atomic_write(src / last[0], last[1])
            publish_folder(src, self.path(name))
