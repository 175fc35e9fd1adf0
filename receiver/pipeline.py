"""The body's path to disk: receive on the event loop, write and hash in a thread.

Chunks are gathered into batches of about 2 MiB; one batch is written (writev,
no copy) and hashed in a worker thread while the event loop receives the next,
so receiving and writing overlap and memory stays at about two batches per
upload. The tar validator gets the same chunks in its own thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from episode_common.durable import start_writeback
from receiver.digests import BodyDigest, BodyHasher, DeclaredDigest
from receiver.errors import TooLarge
from receiver.tarcheck import StreamValidator, TarSummary

BATCH_BYTES = 2 * 1024 * 1024
# Start writeback of what was written every so often, so the final fsync has little left.
WRITEBACK_BYTES = 16 * 1024 * 1024
_IOV_MAX = 1024


class BodySink:
    """Consumes one upload body: size cap, digests, validation and the bytes on disk.

    sha-256 is always computed; sha-512 too when `declared` carries one.
    """

    def __init__(
        self,
        fd: int | None,
        validator: StreamValidator | None,
        max_bytes: int,
        free_space_check: Callable[[], None] | None = None,
        declared: DeclaredDigest | None = None,
    ) -> None:
        self._fd = fd
        self._validator = validator
        self._max_bytes = max_bytes
        self._free_space_check = free_space_check
        self._hasher = BodyHasher(declared)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._pending: asyncio.Future[None] | None = None
        self.size = 0
        self._written = 0  # touched only by the worker thread
        self._synced_upto = 0
        self._next_space_check = 256 * 1024 * 1024

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise TooLarge(f"body exceeds max_upload_bytes ({self._max_bytes})")
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= BATCH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._pending is not None:
            await self._pending  # one batch in the thread at a time keeps order and memory
            self._pending = None
        if self._free_space_check is not None and self.size >= self._next_space_check:
            self._next_space_check = self.size + 256 * 1024 * 1024
            self._free_space_check()
        if batch:
            loop = asyncio.get_running_loop()
            self._pending = loop.run_in_executor(None, self._consume, batch)

    def _consume(self, batch: list[bytes]) -> None:
        """In a worker thread: write, hash, hand to the validator."""
        if self._fd is not None:
            for start in range(0, len(batch), _IOV_MAX):
                write_all(self._fd, batch[start : start + _IOV_MAX])
        for chunk in batch:
            self._hasher.update(chunk)
        validator = self._validator
        if validator is not None and validator.failed is None:
            for chunk in batch:
                validator.feed(chunk)
        self._written += sum(len(chunk) for chunk in batch)
        if self._fd is not None and self._written - self._synced_upto >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._synced_upto, 0)
            self._synced_upto = self._written

    def validation_failed(self) -> Exception | None:
        return None if self._validator is None else self._validator.failed

    async def finish(self) -> tuple[str, TarSummary | None]:
        """Write what is left, wait for the validator; returns (sha256 hex, summary)."""
        await self._flush()
        if self._pending is not None:
            await self._pending
            self._pending = None
        summary = None
        if self._validator is not None:
            loop = asyncio.get_running_loop()
            summary = await loop.run_in_executor(None, self._validator.finish)
        return self._hasher.digest().sha256, summary

    def digest(self) -> BodyDigest:
        """Every digest of the body; complete once finish() has returned."""
        return self._hasher.digest()

    async def abort(self) -> None:
        """Stop the thread work of a failed upload (the caller removes the temp file)."""
        if self._pending is not None:
            try:
                await self._pending
            except Exception:  # noqa: BLE001 - the upload is already failing; the first error wins
                pass
            self._pending = None
        if self._validator is not None:
            self._validator.abort()


def write_all(fd: int, buffers: list[bytes]) -> None:
    """Write every byte of buffers, in order (writev, then by hand after a short write)."""
    total = sum(len(b) for b in buffers)
    written = os.writev(fd, buffers)
    if written == total:
        return
    # Short write (rare): finish byte by byte from where writev stopped.
    remaining = memoryview(b"".join(buffers))[written:]
    while remaining:
        remaining = remaining[os.write(fd, remaining) :]
