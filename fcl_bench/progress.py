"""Plain progress lines for output that is not a terminal (log files, CI, ``nohup``).

Progress bars (tqdm) are shown only on a terminal; redirected to a file they would be noise. Long work
prints :class:`PlainProgress` lines to stdout instead, about every 10% of the way, with the rate and the
time left, so a ``make run > log`` shows that something is happening.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stdout``) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_seconds(s: float) -> str:
    """``75.3`` -> ``"1 min 15 s"``; ``8.2`` -> ``"8 s"``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class PlainProgress:
    """Prints ``desc: 30% (15,000/50,000 images), 640 images/s, ETA 55 s`` each time another ``every``
    fraction of ``total`` is done (and once at 100%).

    ``enabled=None``: only when ``out`` (default stdout) is not a terminal, where a progress bar is shown
    instead. Lines are flushed at once.
    """

    def __init__(self, total: int, desc: str, unit: str = "images", every: float = 0.1,
                 out: TextIO | None = None, enabled: bool | None = None):
        self.total, self.desc, self.unit, self.every = max(1, int(total)), desc, unit, every
        self.out = out
        self.enabled = (not is_terminal(out)) if enabled is None else enabled
        self.done = 0
        self._next = every
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        frac = self.done / self.total
        if frac + 1e-12 < self._next and self.done < self.total:
            return
        while self._next <= frac + 1e-12:
            self._next += self.every
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"{self.desc}: {100 * min(frac, 1.0):.0f}% ({self.done:,}/{self.total:,} {self.unit}), "
              f"{rate:,.0f} {self.unit}/s, ETA {format_seconds(eta)}", file=self.out or sys.stdout, flush=True)

    def note(self, text: str) -> None:
        """A plain line of its own (``desc: text``), when enabled."""
        if self.enabled:
            print(f"{self.desc}: {text}", file=self.out or sys.stdout, flush=True)
