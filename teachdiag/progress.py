"""Progress that reads well on a terminal and in a log file (SLURM, nohup): one for every command.

    from teachdiag.progress import progress
    bar = progress(total=51600, desc="probe", unit="pos", quiet=False)
    bar.update(172); bar.set_postfix_str("gradient"); bar.close()

On a terminal: a tqdm bar. Elsewhere: tqdm would write every redraw into the log as one endless
line of carriage returns, so a plain line is printed instead every `every` seconds and at the end:

    probe: 12,345/51,600 pos (23.9%), 37.2 pos/s, 19 min left [gradient]
"""

from __future__ import annotations

import sys
import time


class LogLines:
    """tqdm's update / set_postfix_str / close, printed as a line every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.t0 = self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.last >= self.every or self.n >= self.total:
            self._line()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self) -> None:
        self.last = time.time()
        rate = (self.n - self.start_n) / max(self.last - self.t0, 1e-9)
        left = (self.total - self.n) / rate / 60 if rate > 0 else float("nan")
        share = f" ({self.n / self.total:.1%})" if self.total else ""
        tail = f" [{self.postfix}]" if self.postfix else ""
        print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{share}, {rate:.3g} {self.unit}/s, "
              f"{left:.0f} min left{tail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n > self.start_n and time.time() - self.last > 0.5:  # the last state, once
            self._line()


class Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress(total: int, desc: str, unit: str, quiet: bool = False, initial: int = 0, every: float = 30.0):
    """A tqdm bar on a terminal, plain lines in a log, nothing when quiet."""
    if quiet:
        return Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr)
    return LogLines(total, desc, unit, initial, every)
