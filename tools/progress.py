"""A one-line progress bar on stderr: files and bytes done, rate, time left.

Drawn only when the stream is a terminal, so logs, pipes and --json output stay clean.
Worker threads report bytes as they read them; redraws are throttled to a few per second.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

REDRAW_SECONDS = 0.25
BAR_WIDTH = 24


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self,
        label: str,
        files_total: int,
        bytes_total: int,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._label = label
        self._files_total = files_total
        self._bytes_total = bytes_total
        self.files_done = 0
        self.bytes_done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def add_bytes(self, count: int) -> None:
        """Called from worker threads for every block read."""
        with self._lock:
            self.bytes_done += count
            self._maybe_draw()

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
            self._maybe_draw()

    def close(self) -> None:
        """Draw the final state and end the line, so that what follows starts clean."""
        if self.enabled:
            with self._lock:
                self._draw()
                self._stream.write("\n")
                self._stream.flush()

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= REDRAW_SECONDS:
            self._drawn_at = now
            self._draw()

    def _draw(self) -> None:
        elapsed = max(self.elapsed, 1e-6)
        rate = self.bytes_done / elapsed
        fraction = self.bytes_done / self._bytes_total if self._bytes_total else 1.0
        fraction = min(fraction, 1.0)
        filled = int(fraction * BAR_WIDTH)
        left = (self._bytes_total - self.bytes_done) / rate if rate > 0 else 0.0
        line = (
            f"{self._label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{self.files_done}/{self._files_total} files, "
            f"{human_bytes(self.bytes_done)}/{human_bytes(self._bytes_total)}, "
            f"{rate / 1e6:.0f} MB/s, {_clock(left)} left"
        )
        # \r and erase-to-end-of-line: redraw in place on a terminal.
        self._stream.write(f"\r{line}\x1b[K")
        self._stream.flush()
