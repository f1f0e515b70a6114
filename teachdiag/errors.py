"""The tool's own error type: bad input becomes one line and exit code 2.

    raise InputError("bad token id 9999 >= vocab 512", file="r.jsonl", line=3, field="response_ids")

The CLI catches InputError, prints `teachdiag: error: r.jsonl:3: response_ids: ...` and exits 2,
with no traceback. Every stage raises this (never SystemExit) so the library stays usable
from notebooks.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a file, a record, a model path or an option."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(self.one_line())

    def __str__(self) -> str:  # one_line() at raise time would miss a message extended later
        return self.one_line()

    def one_line(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file) + (f":{self.line}" if self.line is not None else "") + ": "
        if self.field is not None:
            where += f"{self.field}: "
        return (where + self.message).replace("\n", " ")


class UnsupportedModel(InputError):
    """The model does not fit the chosen path (a fast probe, linear mode): a choice of flags the
    user can change, e.g. `--params all` or `--mode exact`, so it is reported like bad input."""
