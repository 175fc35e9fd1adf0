"""The terminal progress line of `once`: bytes, total and rate; log lines wipe it first."""

from __future__ import annotations

import io
import logging

from shipper.progress import ClearLine, Progress, human_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_bytes_picks_a_readable_unit() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert human_bytes(5 * 1024**4) == "5120.0 GiB"


def test_the_line_shows_bytes_sent_total_and_rate() -> None:
    clock = Clock()
    progress = Progress(io.StringIO(), clock=clock)
    progress.upload_started(40 << 20)
    clock.now += 2.0
    progress.advance(10 << 20)
    line = progress.line()
    assert "10.0 MiB / 40.0 MiB" in line and "5.0 MiB/s" in line and "1 uploading" in line
    assert line.startswith("[" + "#" * 6 + "." * 18 + "]")


def test_renders_are_throttled_but_starts_and_ends_always_show() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress(stream, clock=clock, interval=1.0)
    progress.upload_started(100)
    for _ in range(50):
        progress.advance(1)
    assert stream.getvalue().count("\r") == 1
    progress.upload_ended()
    assert stream.getvalue().count("\r") == 2


def test_a_log_record_clears_the_line_before_it_is_written() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress.upload_started(10)
    handler = logging.StreamHandler(stream)
    handler.addFilter(ClearLine(progress))
    logger = logging.getLogger("test-progress")
    logger.addHandler(handler)
    try:
        logger.warning("receiver unavailable")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().endswith("\r\x1b[Kreceiver unavailable\n")
    assert not progress.visible
