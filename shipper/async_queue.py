"""The queue for coroutines: every call runs on one dedicated thread, never on the event loop.

Each write commits with an fsync (synchronous=FULL); on the loop that would stall every
upload's stream for as long as the disk takes. One thread keeps the calls in the order
they were made, and a call once made is carried out even if its caller is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from shipper.queue import Queue
from shipper.spool import Kind
from shipper.states import Episode, ReceiverState, Refusal

P = ParamSpec("P")
T = TypeVar("T")


class AsyncQueue:
    """The Queue methods the daemon, pipeline and retention use, as coroutines."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shipper-queue")

    async def _call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(method, *args, **kwargs)
        future = loop.run_in_executor(self._thread, self._locked, call)
        # Shielded: a cancelled caller (shutdown) must not drop a write that was asked
        # for; the single thread still runs it before whatever the caller does next.
        return await asyncio.shield(future)

    def _locked(self, method: Callable[[], T]) -> T:
        with self.queue.lock:  # the connection may be shared with other threads
            return method()

    async def aclose(self) -> None:
        """Wait for the calls already made, then end the thread (the Queue stays open)."""
        await asyncio.to_thread(self._thread.shutdown, wait=True)

    # --- discovery and what to do next -------------------------------------------------

    async def recover(self) -> int:
        return await self._call(self.queue.recover)

    async def make_due_now(self) -> int:
        return await self._call(self.queue.make_due_now)

    async def add(self, episode_id: str, source: Path, kind: Kind, error: str | None) -> bool:
        return await self._call(self.queue.add, episode_id, source, kind, error)

    async def known_sources(self) -> dict[str, Path]:
        return await self._call(self.queue.known_sources)

    async def get(self, episode_id: str) -> Episode | None:
        return await self._call(self.queue.get, episode_id)

    async def next_to_prepare(self, now: float, exclude: AbstractSet[str]) -> Episode | None:
        return await self._call(self.queue.next_to_prepare, now, exclude)

    async def next_to_upload(self, now: float, exclude: AbstractSet[str]) -> Episode | None:
        return await self._call(self.queue.next_to_upload, now, exclude)

    async def packed_backlog(self) -> int:
        return await self._call(self.queue.packed_backlog)

    async def next_due_at(self) -> float | None:
        return await self._call(self.queue.next_due_at)

    # --- transitions -------------------------------------------------------------------

    async def start_packing(self, episode_id: str) -> bool:
        return await self._call(self.queue.start_packing, episode_id)

    async def set_commit(self, episode_id: str, commit: str) -> bool:
        return await self._call(self.queue.set_commit, episode_id, commit)

    async def finish_packing(
        self, episode_id: str, path: Path, sha256: str, size: int, manifest: str | None
    ) -> bool:
        return await self._call(self.queue.finish_packing, episode_id, path, sha256, size, manifest)

    async def forget_packed(self, episode_id: str) -> bool:
        return await self._call(self.queue.forget_packed, episode_id)

    async def start_upload(self, episode_id: str) -> bool:
        return await self._call(self.queue.start_upload, episode_id)

    async def abandon(self, episode_id: str) -> bool:
        return await self._call(self.queue.abandon, episode_id)

    async def shipped(self, episode_id: str) -> bool:
        return await self._call(self.queue.shipped, episode_id)

    async def fatal(self, episode_id: str, reason: str, remediation: str | None = None) -> bool:
        return await self._call(self.queue.fatal, episode_id, reason, remediation)

    async def retry_later(self, episode_id: str, reason: str, next_at: float) -> bool:
        return await self._call(self.queue.retry_later, episode_id, reason, next_at)

    async def digest_mismatch(self, episode_id: str, reason: str) -> bool:
        return await self._call(self.queue.digest_mismatch, episode_id, reason)

    async def refuse_commit(
        self, commit: str, reason: str, remediation: str | None
    ) -> tuple[bool, list[str]]:
        return await self._call(self.queue.refuse_commit, commit, reason, remediation)

    async def refusal(self, commit: str) -> Refusal | None:
        return await self._call(self.queue.refusal, commit)

    async def save_receiver(self, state: ReceiverState) -> None:
        await self._call(self.queue.save_receiver, state)

    # --- packed copies and retention ---------------------------------------------------

    async def packed_copies(self) -> list[Episode]:
        return await self._call(self.queue.packed_copies)

    async def packed_copy_removed(self, episode_id: str) -> bool:
        return await self._call(self.queue.packed_copy_removed, episode_id)

    async def mark_changed(self, episode_id: str, files: str) -> bool:
        return await self._call(self.queue.mark_changed, episode_id, files)

    async def due_for_deletion(self, shipped_before: float) -> list[Episode]:
        return await self._call(self.queue.due_for_deletion, shipped_before)

    async def local_deleted(self, episode_id: str) -> bool:
        return await self._call(self.queue.local_deleted, episode_id)
