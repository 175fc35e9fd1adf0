"""The state_dir's lock: one shipper per queue, and who holds it (for `status`).

The holder writes "<pid> <mode> <started at>" into the file; `status` only
probes the flock for an instant and never blocks a daemon that is starting.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

NAME = "shipper.lock"
# A `status` probe holds the lock for microseconds; a starting daemon waits that out
# (a real second shipper is refused after ATTEMPTS * PAUSE seconds).
ATTEMPTS, PAUSE = 20, 0.05


class InUse(Exception):
    """Another shipper holds the state_dir; str() is its pid (or '?')."""


@dataclass(frozen=True)
class Holder:
    pid: int | None
    mode: str | None
    since: float | None


def hold(state_dir: Path, mode: str) -> IO[str]:
    """Take the lock for this process (kept until the handle is closed) or raise InUse."""
    handle = open(state_dir / NAME, "a+")  # held until exit
    for attempt in range(ATTEMPTS):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == ATTEMPTS - 1:
                pid = _read(handle).pid
                handle.close()
                raise InUse(str(pid or "?")) from None
            time.sleep(PAUSE)
    handle.truncate(0)
    handle.write(f"{os.getpid()} {mode} {time.time():.3f}\n")
    handle.flush()
    return handle


def holder(state_dir: Path) -> Holder | None:
    """Who holds the lock now, or None when no shipper runs on this state_dir."""
    try:
        handle = open(state_dir / NAME)  # closed below
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _read(handle: IO[str]) -> Holder:
    handle.seek(0)
    parts = handle.read().split()
    pid = int(parts[0]) if parts and parts[0].isdigit() else None
    mode = parts[1] if len(parts) > 1 else None
    try:
        since = float(parts[2]) if len(parts) > 2 else None
    except ValueError:
        since = None
    return Holder(pid, mode, since)
