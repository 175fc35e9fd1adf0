"""Delete local copies of shipped episodes once `delete_after_days` have passed.

Only episodes the queue holds as shipped (a 2xx whose sha256 equals ours) are
ever touched; fatal and waiting episodes, and directories that changed after
they were packed, are never deleted. A directory is first renamed to a
dot-name, so a half-deleted episode never looks like one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from shipper import changes
from shipper.async_queue import AsyncQueue
from shipper.spool import Kind
from shipper.states import Episode

log = logging.getLogger(__name__)

DAY = 86400.0


def remove_local_copy(episode: Episode, spool_dir: Path, packed_dir: Path) -> None:
    """Remove the spool entry (and any packed copy of ours) of one shipped episode."""
    source = episode.source
    if source.parent != spool_dir:
        # The spool moved since (config change): never delete outside the spool.
        raise ValueError(f"{source} is not in spool_dir {spool_dir}")
    if episode.kind is Kind.DIRECTORY:
        if source.is_dir() and not source.is_symlink():
            doomed = spool_dir / f".deleting-{episode.episode_id}-{secrets.token_hex(4)}"
            os.rename(source, doomed)
            shutil.rmtree(doomed)
    else:
        source.unlink(missing_ok=True)
    packed = episode.packed_path
    if packed is not None and packed.parent == packed_dir:
        packed.unlink(missing_ok=True)


def late_files(episode: Episode) -> list[str]:
    """Files of a directory episode that are new or changed since it was packed (thread-safe)."""
    if episode.kind is not Kind.DIRECTORY or episode.manifest is None:
        return []
    if episode.changed_files is not None or not episode.source.is_dir():
        return []
    return changes.changed_files(episode.source, changes.decode(episode.manifest))


async def report_late_files(queue: AsyncQueue, episode: Episode, files: list[str]) -> None:
    """Once per episode: mark it (retention keeps it, `status` shows it) and warn."""
    text = changes.summary(files)
    await queue.mark_changed(episode.episode_id, text)
    log.warning(
        "%s: %s changed after it was packed (%s); the receiver holds the copy packed"
        " before, so this directory is kept, never deleted: ship the late files as a new"
        " episode, then remove it by hand",
        episode.episode_id,
        episode.source,
        text,
    )


def finish_interrupted_deletions(spool_dir: Path) -> None:
    """rmtree what a crash left half-deleted (already renamed to .deleting-*)."""
    for leftover in spool_dir.glob(".deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)


async def sweep(
    queue: AsyncQueue, spool_dir: Path, packed_dir: Path, delete_after_days: float
) -> int:
    """Delete every local copy that is due; returns how many were deleted."""
    cutoff = time.time() - delete_after_days * DAY
    deleted = 0
    for episode in await queue.due_for_deletion(cutoff):
        if files := await asyncio.to_thread(late_files, episode):
            await report_late_files(queue, episode, files)
            continue
        try:
            await asyncio.to_thread(remove_local_copy, episode, spool_dir, packed_dir)
        except (OSError, ValueError) as error:
            log.warning("%s: local copy not deleted: %s", episode.episode_id, error)
            continue
        await queue.local_deleted(episode.episode_id)
        deleted += 1
        log.info("%s: local copy deleted (shipped, retention passed)", episode.episode_id)
    return deleted
