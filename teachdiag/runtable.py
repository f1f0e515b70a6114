"""The run folder's token table: tokens.csv (one row per probed position) and run.json, written
through the run output (runfolder.RunOutput) by probe and viability.

    from teachdiag.runtable import RunWriter
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
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from teachdiag.errors import InputError
from teachdiag.runfolder import RunOutput, disk_faults
from teachdiag.scores import teachability_columns
from teachdiag.table import COLUMNS, RUN, TEXT_COLUMNS, TOKENS, all_parts, part_files, read_tokens, row_parts, rows_to_csv


class RunWriter:
    """Owns one run folder's table (one rank's part of it) through its RunOutput, `output`; see the
    module docstring for the files."""

    def __init__(self, out: str | Path, overwrite: bool = False, resume: bool = False, rank: int = 0,
                 columns: list[str] = COLUMNS, text_columns: tuple[str, ...] = TEXT_COLUMNS,
                 table: str = TOKENS, key: tuple[str, ...] = ("context_id", "position")) -> None:
        """columns/text_columns/table/key: tokens.csv's by default; `teachdiag viability` writes
        viability.csv (one row per position and alternative) through the same machinery."""
        self.output = RunOutput(out, RUN, overwrite=overwrite, resume=resume, rank=rank)  # claimed and locked
        self.out, self.rank = self.output.folder, rank
        self.columns, self.text_columns, self.table, self.key = columns, text_columns, table, list(key)
        self.fresh = overwrite and not resume  # old files go in start(), once the models have loaded
        self.partial, self.progress = part_files(self.out, rank)

    def repair(self, own_only: bool = False) -> None:
        """Cut a torn last write off every part (rank 0, before any rank reads done_contexts),
        or off this rank's own part (after Ctrl-C, which can land between its two writes)."""
        with disk_faults(self.out):  # its reads too: an unreadable part is the environment, one line
            self._repair(own_only)

    def _repair(self, own_only: bool) -> None:
        seen: set[str] = set()  # a context found in an earlier part is not taken twice
        for partial, progress in [(self.partial, self.progress)] if own_only else all_parts(self.out):
            # no progress file: killed before its first context was recorded, so nothing counts
            entries = _progress_entries(progress) if progress.exists() else []
            data = partial.read_bytes() if partial.exists() else b""
            entries = self._whole_contexts(data, entries, seen)
            self.output.cut(partial, entries[-1]["bytes"] if entries else 0)
            self.output.write(progress, "".join(json.dumps(e) + "\n" for e in entries))

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
        if self.fresh:
            self.output.remove(*[p for part in all_parts(self.out) for p in part], self.table, RUN)
        self.write_record(dict(record, complete=False))

    def check_resume(self, record: dict, same_options: tuple[str, ...],
                     models: Callable[[dict], dict] = lambda r: {"teacher": r["teacher"], "student": r["student"]},
                     added: dict | None = None) -> None:
        """Refuse to --resume this folder into `record` unless it is an unfinished run of the same work:
        the options in `same_options`, the models' weights (`models`: name -> run-record entry, or None
        where a run has no such model), the contexts file and the table's columns all unchanged.
        added: options newer than some run records, with the value those runs had."""
        old_path = self.out / RUN
        old = self.output.previous()
        if old is None:
            raise InputError("nothing to resume (no run.json)", field="--resume", file=str(self.out))
        try:
            old["options"], old["contexts"], models(old)
        except (KeyError, TypeError, AttributeError):
            raise InputError("is not a teachdiag run record", field="--resume", file=str(old_path)) from None
        for key in same_options:
            was = old["options"].get(key, (added or {}).get(key))
            if was != record["options"].get(key):
                raise InputError(f"option {key} differs from the run being resumed "
                                 f"({was!r} vs {record['options'].get(key)!r})",
                                 field="--resume", file=str(old_path))
        self.output.check_models(models(old), models(record))
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
        """run.json as given (start and finish_table set "complete"; probe adds "interrupted")."""
        self.output.write_record(record)

    def append_context(self, context_id: str, rows: list[dict]) -> None:
        """One finished context's rows, then its progress entry: a torn write here is cut off by the
        next resume's repair()."""
        header = not self.partial.exists() or self.partial.stat().st_size == 0
        self.output.append(self.partial, rows_to_csv(rows, header=header, columns=self.columns))
        self.output.append(self.progress, json.dumps({"id": context_id, "bytes": self.partial.stat().st_size}) + "\n")

    def merged_rows(self, order: list[str]) -> pd.DataFrame:
        """Every part's rows, contexts in `order` (the single-process order), each exactly once."""
        parts = [read_tokens(p, self.columns, self.text_columns) for p in row_parts(self.out)]
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
        self.output.write(self.table, rows_to_csv(rows, header=True, columns=self.columns),
                          "every part is kept; free space or fix permissions, then rerun with --resume to merge them")
        self.write_record(dict(record, complete=True))
        self.output.remove(*[p for part in all_parts(self.out) for p in part])
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
