"""Named crash points in the write path, for the reliability tests only.

EPISODE_INGEST_FAILPOINTS="after-fsync,after-index-append" makes the process
SIGKILL itself when it reaches one of those points. The variable is read once,
at import; unset (production), every hook is one test of an empty set.
"""

from __future__ import annotations

import os
import signal

ENV = "EPISODE_INGEST_FAILPOINTS"

AFTER_TEMP_WRITE = "after-temp-write"  # every body byte written to the temp file, not fsynced
AFTER_FSYNC = "after-fsync"  # temp file fsynced, not yet linked under its final name
AFTER_INSTALL = "after-install"  # linked under the final name, directory fsynced, no row
DURING_INDEX_APPEND = "during-index-append"  # half of the row written to index.jsonl
BEFORE_VIEW_UPDATE = "before-view-update"  # row fsynced in index.jsonl, not yet in its view
AFTER_INDEX_APPEND = "after-index-append"  # row fsynced, temp name not yet removed
BEFORE_RESPONSE = "before-response"  # everything durable and tidied, 201 not yet sent

POINTS = (
    AFTER_TEMP_WRITE,
    AFTER_FSYNC,
    AFTER_INSTALL,
    DURING_INDEX_APPEND,
    BEFORE_VIEW_UPDATE,
    AFTER_INDEX_APPEND,
    BEFORE_RESPONSE,
)


def parse(value: str) -> frozenset[str]:
    """The names in a comma-separated list; a name that is no failpoint is a typo: raise."""
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = names.difference(POINTS)
    if unknown:
        raise ValueError(f"{ENV}: unknown failpoint(s) {sorted(unknown)}; known: {list(POINTS)}")
    return names


_enabled = parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Die here if the failpoint `name` is enabled."""
    if _enabled and name in _enabled:
        _die()


def torn_write(name: str, fd: int, data: bytes) -> None:
    """If `name` is enabled, write the first half of data to fd and die (a torn append)."""
    if _enabled and name in _enabled:
        os.write(fd, data[: len(data) // 2])
        _die()


def _die() -> None:
    # SIGKILL: no atexit, no finally blocks, no flush; what is on disk is what a crash leaves.
    os.kill(os.getpid(), signal.SIGKILL)
