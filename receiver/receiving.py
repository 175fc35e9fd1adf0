"""An accepted upload's body into the blob store, checked, then its catalogue row.

Blocking work runs in worker threads, in as few hand-offs as the order allows: each
hand-off costs two thread switches and an event-loop wake-up, which under a load of small
uploads was a third of the receiver's CPU. A body of at most SMALL_BODY_BYTES is received
into memory, then hashed, validated, written, committed and indexed in one hand-off (a
rejected small body never reaches the store); a larger one streams through BodySink and
is committed and indexed in one more.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from receiver import failpoints
from receiver.config import ReceiverConfig
from receiver.digests import BodyDigest, DeclaredDigest, hash_body
from receiver.errors import CommitMismatch, Conflict, InsufficientStorage, InvalidTarball
from receiver.ids import normalise_commit
from receiver.limits import UploadAdmission
from receiver.pipeline import BodySink
from receiver.storage import BlobWriter, DurabilityError, IndexRow, Storage, new_row
from receiver.tarcheck import INLINE_BYTES, StreamValidator, TarSummary

log = logging.getLogger(__name__)

# Bodies up to this size (by Content-Length) are received into memory and stored in
# one thread hand-off; the tar validator checks bodies this small inline anyway.
SMALL_BODY_BYTES = INLINE_BYTES
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


@dataclass
class Upload:
    """What one PUT said, and what the checks learned about it on the way."""

    host_id: str
    episode_id: str
    sent_commit: str | None  # the commit header as sent
    content_length: int | None = None
    content_digest: str | None = None  # the header as sent; parsed in its turn
    body: AsyncIterator[bytes] = field(default_factory=_no_body)
    commit: str | None = None  # the header's commit, normalised (None only with the gate off)
    declared: DeclaredDigest | None = None
    restore: IndexRow | None = None  # the row of an indexed episode whose blob is gone
    reserved: int = 0  # bytes of free space reserved for it


@dataclass
class Reply:
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _as_no_space(error: OSError) -> InsufficientStorage | OSError:
    if error.errno in _NO_SPACE:
        return InsufficientStorage(
            "the disk filled up during the upload", headers={"Retry-After": "60"}
        )
    return error


class Receiver:
    """Receives and stores the body of an upload that passed every check before the body."""

    def __init__(
        self,
        config: ReceiverConfig,
        storage: Storage,
        admission: UploadAdmission,
        on_fatal: Callable[[str], NoReturn],
    ) -> None:
        self.config = config
        self.storage = storage
        self.admission = admission
        self._on_fatal = on_fatal

    async def receive(self, upload: Upload) -> tuple[IndexRow | None, str]:
        """(the row written, or None when the name was taken meanwhile; the body's sha256)."""
        if 0 < upload.reserved <= min(SMALL_BODY_BYTES, self.config.storage.max_upload_bytes):
            data = b"".join([chunk async for chunk in upload.body])
            return await asyncio.to_thread(self._store_small, upload, data)
        return await self._store_streamed(upload)

    def _store_small(self, upload: Upload, data: bytes) -> tuple[IndexRow | None, str]:
        """In a worker thread: a whole small body checked, then written, committed, indexed."""
        digest = hash_body(data, upload.declared)
        summary = None
        if self.config.storage.validate != "none":
            validator = StreamValidator(self.config.storage)
            validator.feed(data)
            summary = validator.finish()
        recorded = self._checked(upload, digest, summary)
        writer = self.storage.blobs.open_writer(
            upload.host_id, upload.episode_id, upload.commit, digest.sha256
        )
        try:
            writer.write([data])
        except OSError as error:
            writer.abort()
            raise _as_no_space(error) from error
        except BaseException:
            writer.abort()
            raise
        row = self._commit_and_index(upload, writer, digest.sha256, len(data), recorded)
        return row, digest.sha256

    async def _store_streamed(self, upload: Upload) -> tuple[IndexRow | None, str]:
        """Stream the body into a writer (written, hashed and validated in threads)."""
        storage = self.config.storage
        blobs = self.storage.blobs
        declared = upload.declared.sha256 if upload.declared is not None else None
        writer = await asyncio.to_thread(
            blobs.open_writer, upload.host_id, upload.episode_id, upload.commit, declared
        )
        validator = StreamValidator(storage) if storage.validate != "none" else None

        def space_check() -> None:
            # Bytes already written are gone from statvfs; only others' reservations count.
            self.admission.check_space(blobs.free_bytes(), 0, mine=upload.reserved)

        sink = BodySink(writer, validator, storage.max_upload_bytes, space_check, upload.declared)
        try:
            sha256, summary = await self._drain(sink, upload.body)
            recorded = self._checked(upload, sink.digest(), summary)
        except BaseException:
            await sink.abort()
            await asyncio.to_thread(writer.abort)
            raise
        # Not cancellable once started: the thread finishes, and the episode is stored.
        row = await asyncio.to_thread(
            self._commit_and_index, upload, writer, sha256, sink.size, recorded
        )
        return row, sha256

    @staticmethod
    async def _drain(sink: BodySink, body: AsyncIterator[bytes]) -> tuple[str, TarSummary | None]:
        try:
            async for chunk in body:
                await sink.write(chunk)
                failed = sink.validation_failed()
                if failed is not None:
                    raise failed
            return await sink.finish()
        except OSError as error:
            raise _as_no_space(error) from error

    def _checked(
        self, upload: Upload, digest: BodyDigest, summary: TarSummary | None
    ) -> str | None:
        """The checks on a complete body; returns the commit to record."""
        if upload.declared is not None:
            upload.declared.check(digest)
        recorded = self._reconcile_commit(upload.commit, summary)
        restore = upload.restore
        if restore is not None and digest.sha256 != restore.sha256:
            raise Conflict(
                "this id is indexed with different content; nothing was stored",
                fields={"stored_sha256": restore.sha256},
            )
        return recorded

    def _reconcile_commit(self, header: str | None, summary: TarSummary | None) -> str | None:
        """The commit to record; meta.json must agree with the header when both exist.

        With the gate on, a walked meta.json must name a commit; with it off, an episode
        that names none anywhere is stored without one (emergency collect mode).
        """
        if summary is None or self.config.storage.validate != "tar":
            return header
        meta_value = summary.meta_commit
        if meta_value is None:
            if self.config.version_gate.enabled:
                raise InvalidTarball("meta.json has no code_version.commit")
            return header
        meta = normalise_commit(meta_value)
        if meta is None:
            raise InvalidTarball(f"meta.json code_version.commit {meta_value!r} is not a commit id")
        if header is not None and meta != header:
            raise CommitMismatch(
                f"meta.json code_version.commit is {meta}, the header says {header}"
            )
        return meta

    def _commit_and_index(
        self, upload: Upload, writer: BlobWriter, sha256: str, size: int, recorded: str | None
    ) -> IndexRow | None:
        """In a worker thread: make a checked blob durable under its name, then its row.

        None when the name was taken meanwhile (the writer leaves nothing). A failed commit
        or append is fatal: the process exits so that start-up recovery looks.
        """
        failpoints.hit(failpoints.AFTER_TEMP_WRITE)
        try:
            committed = writer.commit()
        except DurabilityError as error:
            self._on_fatal(str(error))
        except BaseException:
            writer.abort()
            raise
        if not committed:
            return None
        failpoints.hit(failpoints.AFTER_INSTALL)
        row = self._index(upload, sha256, size, recorded)
        failpoints.hit(failpoints.AFTER_INDEX_APPEND)
        writer.close()
        if row.sha256 != sha256:
            raise self._indexed_meanwhile(row, sha256, self.storage.blobs.where(*row.key))
        failpoints.hit(failpoints.BEFORE_RESPONSE)
        return row

    @staticmethod
    def _indexed_meanwhile(row: IndexRow, sha256: str, where: str) -> Conflict:
        """Another writer's row, with other content, landed between our lookup and append.

        Within one blob store the name claim prevents this; it takes writers that share a
        catalogue but not a blob store. The row wins, as every read trusts it; the blob we
        installed does not match it, and episode-verify reports that.
        """
        host_id, episode_id = row.key
        log.error(
            "host=%s episode=%s: indexed meanwhile with sha256 %s by another writer; the "
            "blob installed at %s has sha256 %s and does not match its row (do all "
            "receivers share one blob store?); run episode-verify",
            host_id,
            episode_id,
            row.sha256,
            where,
            sha256,
        )
        return Conflict(
            "this id was indexed with different content while this upload was stored",
            fields={"stored_sha256": row.sha256},
        )

    def _index(self, upload: Upload, sha256: str, size: int, recorded: str | None) -> IndexRow:
        if upload.restore is not None:
            log.warning(
                "restored lost blob of indexed episode host=%s episode=%s", *upload.restore.key
            )
            return upload.restore
        row = new_row(upload.host_id, upload.episode_id, sha256, size, recorded)
        try:
            row, _appended = self.storage.catalogue.append_if_absent(row)
        except DurabilityError as error:
            self._on_fatal(str(error))
        return row
