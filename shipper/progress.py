"""A one-line progress bar for `once` on a terminal: bytes sent, total, rate.

Only used when stderr is a TTY; journald and pipes get log lines only. Log
records clear the bar first (ClearLine filter), so the two never interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

WIDTH = 24


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    def __init__(
        self,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.started = clock()
        self.sent = 0
        self.total = 0
        self.active = 0
        self.visible = False
        self.last_render = 0.0

    def upload_started(self, size: int) -> None:
        self.total += size
        self.active += 1
        self.render(force=True)

    def upload_ended(self) -> None:
        self.active = max(0, self.active - 1)
        self.render(force=True)

    def advance(self, count: int) -> None:
        self.sent += count
        self.render()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        fraction = min(self.sent / self.total, 1.0) if self.total else 0.0
        filled = int(fraction * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        rate = human_bytes(self.sent / elapsed)
        return (
            f"[{bar}] {human_bytes(self.sent)} / {human_bytes(self.total)}"
            f"  {rate}/s  {self.active} uploading"
        )

    def render(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last_render < self.interval:
            return
        self.last_render = now
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self.visible = True

    def clear(self) -> None:
        if self.visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.visible = False


class ClearLine(logging.Filter):
    """Attached to the log handler: wipe the bar before a record is written."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True
