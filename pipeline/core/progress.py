"""A progress line on stderr shared by every long-running stage.

On a terminal it redraws one line in place; in a log file (CI, nohup) it writes a full line
every `log_every` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import TextIO

ENABLED = True  # the CLI's --quiet turns every progress display off
# Seconds between progress lines in a log (not a terminal); PIPELINE_PROGRESS_EVERY sets it.
LOG_EVERY = float(os.environ.get("PIPELINE_PROGRESS_EVERY", "10"))


class Progress:
    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 redraw_every: float = 0.2, log_every: float | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.counts: Counter[str] = Counter()
        self.status = ""  # free text shown after the counts, e.g. the running loss
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = redraw_every if self._tty else log_every or LOG_EVERY
        self._start = time.monotonic()
        # A log gets its first line after `log_every` seconds (short stages: just the last).
        self._last_draw = 0.0 if self._tty else self._start

    def update(self, n: int = 1, count: str | None = None) -> None:
        self.done += n
        if count:
            self.counts[count] += n
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total:
            filled = int(20 * min(self.done / self.total, 1.0))
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total}")
        else:
            parts.append(str(self.done))
        parts.append(f"{rate:.1f}/s")
        parts.extend(f"{key}={value}" for key, value in sorted(self.counts.items()))
        if self.status:
            parts.append(self.status)
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"eta {_clock((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        return " ".join(parts)

    def _draw(self, final: bool) -> None:
        if not ENABLED:
            return
        if self._tty:
            end = "\n" if final else ""
            self._stream.write(f"\r\x1b[K{self.line()}{end}")
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
