"""Uploads in flight: progress recorded for `status` and logged for long uploads.

The daemon rewrites `<state_dir>/uploads.json` (temp + rename, not fsynced: it is
advice, not state) at most every `progress_record_seconds`, and logs one line per
upload every `progress_log_seconds` while it lasts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipper.progress import human_bytes

log = logging.getLogger(__name__)

FILE = "uploads.json"


@dataclass
class _Upload:
    size: int
    started_at: float
    sent: int = 0
    logged_at: float = 0.0


class InFlight:
    def __init__(
        self,
        state_dir: Path,
        record_seconds: float,
        log_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = state_dir / FILE
        self.record_seconds = record_seconds
        self.log_seconds = log_seconds
        self.clock = clock
        self.uploads: dict[str, _Upload] = {}
        self.recorded_at = 0.0

    def started(self, episode_id: str, size: int) -> None:
        now = self.clock()
        self.uploads[episode_id] = _Upload(size, now, logged_at=now)
        self._record(now)

    def advance(self, episode_id: str, count: int) -> None:
        upload = self.uploads.get(episode_id)
        if upload is None:
            return
        upload.sent += count
        now = self.clock()
        if now - upload.logged_at >= self.log_seconds:
            upload.logged_at = now
            log.info("%s: uploading, %s", episode_id, describe(entry(upload, now)))
        if now - self.recorded_at >= self.record_seconds:
            self._record(now)

    def ended(self, episode_id: str) -> None:
        self.uploads.pop(episode_id, None)
        self._record(self.clock())

    def _record(self, now: float) -> None:
        self.recorded_at = now
        document = {key: entry(upload, now) for key, upload in self.uploads.items()}
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(document))
            os.replace(tmp, self.path)
        except OSError as error:  # progress is advice: never fail an upload over it
            log.warning("cannot record upload progress in %s: %s", self.path, error)


def entry(upload: _Upload, now: float) -> dict[str, Any]:
    return {
        "sent_bytes": upload.sent,
        "size_bytes": upload.size,
        "started_at": upload.started_at,
        "updated_at": now,
    }


def read(state_dir: Path) -> dict[str, dict[str, Any]]:
    """What the daemon last recorded; {} when nothing is (or cannot be) read."""
    try:
        value = json.loads((state_dir / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def rate_and_eta(item: dict[str, Any]) -> tuple[float | None, float | None]:
    """Bytes per second so far, and seconds left at that rate (None until known)."""
    elapsed = float(item["updated_at"]) - float(item["started_at"])
    sent, size = int(item["sent_bytes"]), int(item["size_bytes"])
    if elapsed <= 0 or sent <= 0:
        return None, None
    rate = sent / elapsed
    return rate, max(size - sent, 0) / rate


def describe(item: dict[str, Any]) -> str:
    """'120.0 MiB of 950.0 MiB (13%), 45.2 MiB/s, ETA 18 s' for a log line or `status`."""
    sent, size = int(item["sent_bytes"]), int(item["size_bytes"])
    percent = 100 * sent // size if size else 100
    rate, eta = rate_and_eta(item)
    speed = "-" if rate is None else f"{human_bytes(rate)}/s"
    left = "-" if eta is None else f"{eta:.0f} s"
    return f"{human_bytes(sent)} of {human_bytes(size)} ({percent}%), {speed}, ETA {left}"
