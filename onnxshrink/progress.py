"""A small progress bar on stderr (no dependency): items done/total, rate and time left.

On a terminal it redraws one line at most ``min_interval`` seconds apart; elsewhere (logs, CI) it writes a
line every ``log_interval`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class ProgressBar:
    def __init__(self, total: int | None, label: str = "calibrating", unit: str = "samples", *,
                 stream=None, width: int = 24, min_interval: float = 0.1, log_interval: float = 10.0):
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = min_interval if self._tty else log_interval

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            filled = min(self.width, self.width * self.done // self.total)
            bar = "#" * filled + "." * (self.width - filled)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            return (f"{self.label} [{bar}] {self.done}/{self.total} {self.unit}  "
                    f"{rate:.1f} {self.unit}/s  {left:.0f}s left")
        return f"{self.label} {self.done} {self.unit}  {rate:.1f} {self.unit}/s"

    def _draw(self, final: bool) -> None:
        text = self.line()
        if self._tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class _Callback:
    def __init__(self, fn: Callable[[int, int | None], None], total: int | None):
        self.fn, self.total, self.done = fn, total, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(progress: bool | Callable | None, total: int | None, label: str = "calibrating",
                  unit: str = "samples"):
    """``True``: a ``ProgressBar`` on stderr; a callable: called as ``fn(done, total)``; falsy: nothing."""
    if callable(progress):
        return _Callback(progress, total)
    if progress:
        return ProgressBar(total, label, unit)
    return _Silent()


class Phases(dict):
    """Seconds per step of a long job (``quantize``, ``prune``), in order: ``lap(name)`` adds the time
    since the last lap (or since ``t0``, counted as ``first``) to ``name``."""

    def __init__(self, t0: float, first: str) -> None:
        super().__init__()
        self._last = t0
        self.lap(first)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self[name] = round(self.get(name, 0.0) + now - self._last, 3)
        self._last = now

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn``, which laps ``name`` when it returns or raises (for a step run deep inside another)."""

        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                self.lap(name)
        return run
