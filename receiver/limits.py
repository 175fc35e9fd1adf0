"""Admission control for uploads: concurrency caps, disk reservations, body timeouts.

All checks happen before a byte of the body is read. Reservations are per
process: with several workers each one accounts for its own in-flight uploads
(the free space that others have already written is seen by statvfs anyway).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from receiver.errors import (
    BodyTimeout,
    InsufficientStorage,
    ServerBusy,
    TooManyUploadsFromHost,
)

RETRY_AFTER_BUSY = "5"
RETRY_AFTER_DISK = "60"
# The least a body must advance per body_timeout_seconds (64 KiB per minute by default).
MIN_PROGRESS_BYTES = 64 * 1024


class UploadAdmission:
    def __init__(self, max_total: int, max_per_host: int, min_free_bytes: int) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.min_free_bytes = min_free_bytes
        self._per_host: Counter[str] = Counter()
        self._active = 0
        self.reserved_bytes = 0

    @property
    def active(self) -> int:
        return self._active

    @contextmanager
    def slot(self, host_id: str) -> Iterator[None]:
        """Hold one upload slot for host_id, or raise 503/429 at once."""
        # The host's own cap first: when it is the cause, 429 tells it so.
        if self._per_host[host_id] >= self.max_per_host:
            raise TooManyUploadsFromHost(
                f"{self._per_host[host_id]} uploads from this host in progress "
                "(max_concurrent_uploads_per_host)",
                headers={"Retry-After": RETRY_AFTER_BUSY},
            )
        if self._active >= self.max_total:
            raise ServerBusy(
                f"{self._active} uploads in progress (max_concurrent_uploads)",
                headers={"Retry-After": RETRY_AFTER_BUSY},
            )
        self._active += 1
        self._per_host[host_id] += 1
        try:
            yield
        finally:
            self._active -= 1
            self._per_host[host_id] -= 1
            if not self._per_host[host_id]:
                del self._per_host[host_id]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no upload holds a slot (cancelled ones finish their clean-up)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return not self._active

    @contextmanager
    def reservation(self, free_bytes: int | None, needed: int) -> Iterator[None]:
        """Reserve `needed` bytes of free space for an upload, or raise 507.

        free_bytes is None for a store that is not a local disk: nothing to reserve.
        """
        self.check_space(free_bytes, needed)
        self.reserved_bytes += needed
        try:
            yield
        finally:
            self.reserved_bytes -= needed

    def check_space(self, free_bytes: int | None, needed: int, *, mine: int = 0) -> None:
        """free space, less what other in-flight uploads reserved, must stay >= min_free."""
        if free_bytes is None:
            return
        others = self.reserved_bytes - mine
        if free_bytes - others - needed < self.min_free_bytes:
            raise InsufficientStorage(
                f"storing {needed} bytes would leave less than min_free_bytes "
                f"({self.min_free_bytes}) free",
                headers={"Retry-After": RETRY_AFTER_DISK},
            )


async def with_body_timeout(
    body: AsyncIterator[bytes], seconds: float, min_progress: int = MIN_PROGRESS_BYTES
) -> AsyncIterator[bytes]:
    """Yield the body's chunks; 408 for a client that sends less than min_progress bytes
    in `seconds` of waiting for it: silence, or a slow drip that would hold a slot forever.

    Only time spent waiting for the client counts, not time spent writing what it sent.
    """
    iterator = body.__aiter__()
    loop = asyncio.get_running_loop()
    waited = 0.0
    progress = 0
    while True:
        started = loop.time()
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), timeout=max(0.0, seconds - waited))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BodyTimeout(f"less than {min_progress} bytes of body in {seconds:g} s") from None
        waited += loop.time() - started
        progress += len(chunk)
        if progress >= min_progress:
            waited, progress = 0.0, 0
        yield chunk
