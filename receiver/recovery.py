"""Start-up recovery, run once before any worker serves.

Holds the data_dir's instance lock (one receiver per data_dir), recovers the catalogue
(a corrupt middle row stops the start, a torn last row is cut), indexes blobs that were
committed but not yet indexed when the last run died, and lets the store drop every
other leftover of an upload in progress.
"""

from __future__ import annotations

import fcntl
import logging
import os

from receiver.checks import check_storage
from receiver.config import ReceiverConfig
from receiver.storage import (
    BackendUnavailable,
    CatalogueCorrupt,
    DataDirLayout,
    DurabilityError,
    Storage,
    open_storage,
)
from receiver.stored_rows import row_for_stored_blob

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The receiver cannot start; str() is the one line to show."""

    exit_code = 2  # a person must look; restarting will not help


class RecoveryIOError(StartupError):
    """The disk refused recovery's writes (full, failing): a restart may succeed later."""

    exit_code = 70  # as for an fsync failure while serving: restart and recover again


def take_instance_lock(config: ReceiverConfig) -> int:
    """Keep the returned descriptor open for the life of the server."""
    path = DataDirLayout(config.storage.data_dir).instance_lock_path
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
    problem = check_storage(config)
    if problem is not None:
        line, transient = problem
        raise (RecoveryIOError if transient else StartupError)(line)
    try:
        storage = _recover(config)
    except BackendUnavailable as error:
        # The database or object store is down: a restart later may find it up.
        raise RecoveryIOError(f"recovery could not reach a storage backend: {error}") from None
    except (DurabilityError, OSError) as error:
        # A full or failing disk: one line and exit 70 (systemd restarts us), no traceback.
        raise RecoveryIOError(
            f"recovery failed on {config.storage.data_dir}: {error}; "
            "free space or fix the disk, then start again"
        ) from None
    storage.close()  # the workers open the view again: with it current, that costs no reading


def _recover(config: ReceiverConfig) -> Storage:
    storage = open_storage(config)
    storage.blobs.prepare()
    try:
        state = storage.catalogue.recover()
    except CatalogueCorrupt as error:
        raise StartupError(str(error)) from None
    repaired = 0
    for blob in storage.blobs.recover():
        row = row_for_stored_blob(
            storage.blobs,
            config.storage,
            blob.host_id,
            blob.episode_id,
            commit=blob.commit,
            backfilled=False,
        )
        _, appended = storage.catalogue.append_if_absent(row)
        repaired += appended
        storage.blobs.forget_note(blob)
    if repaired:
        log.warning("recovery: indexed %d stored tarball(s) whose row was missing", repaired)
    log.info("index: %d rows", state.rows + repaired)
    return storage
