"""The shipper's main loop: discover settled episodes, schedule pack and upload, shut down.

`run` watches the spool until told to stop; `once` ships what is finished now
and returns. The queue is the only source of truth: the loop re-reads it on
every turn, so `episode-shipper retry` from another process takes effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from episode_common.wire import ID_RULE, is_valid_id
from shipper import retention
from shipper.async_queue import AsyncQueue
from shipper.backoff import ReceiverHealth
from shipper.config import ShipperConfig
from shipper.pipeline import Pipeline
from shipper.progress import Progress
from shipper.queue import Queue
from shipper.retention import late_files
from shipper.spool import Entry, entry_for, last_change, watch_names
from shipper.upload import ReceiverClient

log = logging.getLogger(__name__)

# Packed copies waiting for the receiver, beyond the upload slots: packing runs
# ahead of uploads, but not so far that a receiver outage fills the disk.
PACK_AHEAD = 2
# The loop looks at the queue at least this often (another process may change it).
MAX_SLEEP = 2.0


def _survey(
    spool_dir: Path, names: set[str] | None, known: dict[str, Path]
) -> tuple[list[tuple[Entry, float]], list[Entry]]:
    """Unknown candidates with their last change, and entries whose id is already
    queued from another path (runs in a thread)."""
    found, clashes = [], []
    for name in sorted(names) if names is not None else sorted(_listdir(spool_dir)):
        entry = entry_for(spool_dir, name)
        if entry is None:
            continue
        if entry.episode_id in known:
            if known[entry.episode_id] != entry.path:
                clashes.append(entry)
            continue
        changed = last_change(entry)
        if changed is not None:
            found.append((entry, changed))
    return found, clashes


def _listdir(path: Path) -> list[str]:
    try:
        return [entry.name for entry in path.iterdir()]
    except OSError as error:
        log.error("cannot list spool_dir %s: %s", path, error)
        return []


class Daemon:
    def __init__(
        self,
        config: ShipperConfig,
        queue: Queue,
        client: ReceiverClient,
        *,
        once: bool = False,
        progress: Progress | None = None,
        health: ReceiverHealth | None = None,
    ) -> None:
        self.config = config
        self.queue = AsyncQueue(queue)
        self.once = once
        retry = config.retry
        self.health = health or ReceiverHealth(retry.base_seconds, retry.max_seconds)
        self.pipeline = Pipeline(config, self.queue, client, self.health, progress=progress)
        self.preparing: dict[str, asyncio.Task[None]] = {}
        self.uploading: dict[str, asyncio.Task[None]] = {}
        self.unsettled: dict[str, float] = {}  # name -> when to look again
        self.events_at: dict[str, float] = {}  # name -> time of its last file-system event
        self.dirty: set[str] = set()
        self.reported: set[Path] = set()  # duplicate ids already warned about
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        retention.finish_interrupted_deletions(self.config.spool_dir)
        if recovered := await self.queue.recover():
            log.info("resuming %d episode(s) interrupted by a crash or restart", recovered)
        if orphans := await self.pipeline.start():
            log.info("removed %d packed copy(ies) left without an episode", orphans)
        if self.once:
            await self.queue.make_due_now()
        await self._scan(None)
        if self.once and self.unsettled:
            log.info(
                "not finished yet (changed within settle_seconds), left for a later run: %s",
                ", ".join(sorted(self.unsettled)),
            )
            self.unsettled.clear()
        helpers = [asyncio.create_task(self._relay(stop))]
        if not self.once:
            helpers.append(asyncio.create_task(self._watch(stop)))
        next_rescan = time.time() + self.config.rescan_seconds
        next_sweep = 0.0
        try:
            while not stop.is_set():
                now = time.time()
                if not self.once:
                    if now >= next_rescan:
                        await self._scan(None)
                        next_rescan = now + self.config.rescan_seconds
                    else:
                        due = {name for name, at in self.unsettled.items() if at <= now}
                        if self.dirty or due:
                            names, self.dirty = self.dirty | due, set()
                            await self._scan(names)
                if now >= next_sweep:
                    await self._sweep()
                    next_sweep = now + min(self.config.rescan_seconds, 3600.0)
                # _dispatch awaits the queue, so a task may end while it runs (and set wake):
                # only a turn in which none did may end `once`.
                self.wake.clear()
                await self._dispatch()
                if self.once and not (self.preparing or self.uploading or self.wake.is_set()):
                    break
                timeout = await self._sleep_for(next_rescan)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)
            if self.once and self.config.retention.delete_after_days == 0:
                await self._sweep()
        finally:
            await self._shutdown(helpers)

    async def _scan(self, names: set[str] | None) -> None:
        """Register settled entries; remember when to look again at the others."""
        known = await self.queue.known_sources()
        found, clashes = await asyncio.to_thread(_survey, self.config.spool_dir, names, known)
        for entry in clashes:
            self._report_clash(entry, known[entry.episode_id])
        if names is not None:
            await self._look_for_late_files(names & known.keys())
        now = time.time()
        if names is None:
            self.unsettled = {}
            horizon = self.config.settle_seconds + self.config.rescan_seconds
            self.events_at = {n: t for n, t in self.events_at.items() if now - t < horizon}
        else:
            # Looked at now: what is still unsettled is re-added below, the rest is gone.
            for name in names:
                self.unsettled.pop(name, None)
        for entry, changed in found:
            name = entry.path.name
            settled_at = max(changed, self.events_at.get(name, 0.0)) + self.config.settle_seconds
            if settled_at > now:
                self.unsettled[name] = settled_at
                continue
            self.unsettled.pop(name, None)
            self.events_at.pop(name, None)
            error = None
            if not is_valid_id(entry.episode_id):
                error = f"invalid episode id: must match {ID_RULE}"
            if not await self.queue.add(entry.episode_id, entry.path, entry.kind, error):
                # Both <id>/ and <id>.tar.zst turned up in this same scan.
                if (first := await self.queue.get(entry.episode_id)) is not None:
                    self._report_clash(entry, first.source)
            elif error:
                log.error("%s: not shipped: %s", name, error)
            else:
                log.info("%s: finished, queued (%s)", entry.episode_id, entry.kind)

    async def _look_for_late_files(self, names: set[str]) -> None:
        """Events in a queued directory: did it change after it was packed?"""
        for name in sorted(names):
            episode = await self.queue.get(name)
            if episode is not None and (files := await asyncio.to_thread(late_files, episode)):
                await retention.report_late_files(self.queue, episode, files)

    def _report_clash(self, entry: Entry, first: Path) -> None:
        """Once per path: an id is shipped once, from the entry that was found first."""
        if entry.path not in self.reported:
            self.reported.add(entry.path)
            log.warning(
                "%s: ignored: episode id %s is already queued from %s",
                entry.path,
                entry.episode_id,
                first,
            )

    async def _sweep(self) -> None:
        config = self.config
        days = config.retention.delete_after_days
        await retention.sweep(self.queue, config.spool_dir, config.packed_dir, days)

    async def _dispatch(self) -> None:
        """Start whatever may start now: one pack at a time, `concurrency` uploads."""
        now = time.time()
        busy = set(self.preparing) | set(self.uploading)
        if not self.preparing:
            limit = self.config.concurrency + PACK_AHEAD
            episode = await self.queue.next_to_prepare(now, busy)
            if episode is not None and await self.queue.packed_backlog() < limit:
                self._start(self.preparing, episode.episode_id, self.pipeline.prepare(episode))
        while len(self.uploading) < self.config.concurrency and self.health.may_start():
            episode = await self.queue.next_to_upload(now, busy | set(self.uploading))
            if episode is None:
                break
            token = self.health.start()
            self._start(self.uploading, episode.episode_id, self.pipeline.upload(episode, token))

    def _start(
        self, tasks: dict[str, asyncio.Task[None]], key: str, work: Coroutine[Any, Any, None]
    ) -> None:
        task = asyncio.create_task(work)
        tasks[key] = task

        def finished(done: asyncio.Task[None]) -> None:
            tasks.pop(key, None)
            self.wake.set()
            if not done.cancelled() and done.exception() is not None:
                log.error("%s: unexpected error", key, exc_info=done.exception())

        task.add_done_callback(finished)

    async def _sleep_for(self, next_rescan: float) -> float:
        """Until the next thing that time alone makes possible; task ends set wake."""
        now = time.time()
        wake_at = [now + MAX_SLEEP, *self.unsettled.values()]
        if not self.once:
            wake_at.append(next_rescan)
        if (due := await self.queue.next_due_at()) is not None:
            wake_at.append(due)
        if not self.health.healthy:
            wake_at.append(self.health.next_try)
        # Past times are not reasons to wake: what is due but did not start waits
        # for a free slot or the receiver, and those wake the loop themselves.
        future = [at for at in wake_at if at > now]
        return min(max(min(future) - now, 0.05), MAX_SLEEP)

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        # Packing is abandoned at once; uploads get the grace period below.
        self.pipeline.stop()
        self.wake.set()

    async def _watch(self, stop: asyncio.Event) -> None:
        """File-system events only hurry the next look; the rescan is the safety net."""
        try:
            async for names in watch_names(self.config.spool_dir, stop):
                now = time.time()
                for name in names:
                    self.events_at[name] = now
                    if name in self.unsettled:
                        # Still settling: push its deadline instead of walking its
                        # tree again on every burst of writes.
                        settled_at = now + self.config.settle_seconds
                        self.unsettled[name] = max(self.unsettled[name], settled_at)
                    else:
                        self.dirty.add(name)
                self.wake.set()
        except Exception as error:  # inotify limits and friends: rescans carry on
            log.warning("watching %s failed (%s); relying on rescans", self.config.spool_dir, error)

    async def _shutdown(self, helpers: list[asyncio.Task[None]]) -> None:
        self.pipeline.stop()
        in_flight = [*self.preparing.values(), *self.uploading.values()]
        if in_flight:
            grace = self.config.shutdown_grace_seconds
            log.info("shutting down: waiting up to %.0f s for %d task(s)", grace, len(in_flight))
            _done, pending = await asyncio.wait(in_flight, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self.queue.aclose()
