"""The body's path into the blob store: receive on the event loop, write and hash in a thread.

Chunks are gathered into batches of about 2 MiB; one batch is written (by the store's
writer, without a copy) and hashed in a worker thread while the event loop receives the
next, so receiving and writing overlap and memory stays at about two batches per upload.
The tar validator gets the same chunks in its own thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from receiver.digests import BodyDigest, BodyHasher, DeclaredDigest
from receiver.errors import TooLarge
from receiver.storage import BlobWriter
from receiver.tarcheck import StreamValidator, TarSummary

BATCH_BYTES = 2 * 1024 * 1024


class BodySink:
    """Consumes one upload body: size cap, digests, validation and the bytes on disk.

    sha-256 is always computed; sha-512 too when `declared` carries one.
    """

    def __init__(
        self,
        writer: BlobWriter | None,
        validator: StreamValidator | None,
        max_bytes: int,
        free_space_check: Callable[[], None] | None = None,
        declared: DeclaredDigest | None = None,
    ) -> None:
        self._writer = writer
        self._validator = validator
        self._max_bytes = max_bytes
        self._free_space_check = free_space_check
        self._hasher = BodyHasher(declared)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._pending: asyncio.Future[None] | None = None
        self.size = 0
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
        if self._writer is not None:
            self._writer.write(batch)
        for chunk in batch:
            self._hasher.update(chunk)
        validator = self._validator
        if validator is not None and validator.failed is None:
            for chunk in batch:
                validator.feed(chunk)

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
        """Stop the thread work of a failed upload (the caller aborts the writer)."""
        if self._pending is not None:
            try:
                await self._pending
            except Exception:  # noqa: BLE001 - the upload is already failing; the first error wins
                pass
            self._pending = None
        if self._validator is not None:
            self._validator.abort()
