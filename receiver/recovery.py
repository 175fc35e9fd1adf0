"""Start-up recovery, run once before any worker serves.

Holds the data_dir's instance lock (one receiver per data_dir), checks the
index (a corrupt middle line stops the start), cuts a torn last line, indexes
tarballs that were installed but not yet indexed when the last run died, and
removes every other leftover temp file.
"""

from __future__ import annotations

import fcntl
import logging
import os

from receiver.config import ReceiverConfig
from receiver.index import DurabilityError, IndexCorrupt, JsonlIndex, hand_over, new_row
from receiver.store import FilesystemStore, file_digest

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The receiver cannot start; str() is the one line to show."""

    exit_code = 2  # a person must look; restarting will not help


class RecoveryIOError(StartupError):
    """The disk refused recovery's writes (full, failing): a restart may succeed later."""

    exit_code = 70  # as for an fsync failure while serving: restart and recover again


def take_instance_lock(config: ReceiverConfig) -> int:
    """Keep the returned descriptor open for the life of the server."""
    path = config.storage.data_dir / "receiver.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another receiver is already serving {config.storage.data_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def recover(config: ReceiverConfig) -> None:
    try:
        _recover(config)
    except (DurabilityError, OSError) as error:
        # A full or failing disk: one line and exit 70 (systemd restarts us), no traceback.
        raise RecoveryIOError(
            f"recovery failed on {config.storage.data_dir}: {error}; "
            "free space or fix the disk, then start again"
        ) from None


def _recover(config: ReceiverConfig) -> None:
    store = FilesystemStore(config.storage.data_dir)
    store.prepare()
    index = JsonlIndex(config.storage.data_dir / "index.jsonl")
    with index.locked():
        index.repair_torn_tail()
    try:
        index.load(strict=True)
    except IndexCorrupt as error:
        raise StartupError(str(error)) from None
    repaired = 0
    for intent in store.recover():
        sha256, size = file_digest(store.final_path(intent.host_id, intent.episode_id))
        row = new_row(intent.host_id, intent.episode_id, sha256, size, intent.commit)
        _, appended = index.append_if_absent(row)
        repaired += appended
        intent.temp_path.unlink(missing_ok=True)
    if repaired:
        log.warning("recovery: indexed %d stored tarball(s) whose row was missing", repaired)
    log.info("index: %d rows", len(index))
    if config.server.workers == 1:
        hand_over(index)  # the app runs in this process: no second read of the index
