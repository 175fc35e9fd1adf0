"""Upload orchestration: the contract's checks in order, then the durable store path.

Order: ids, commit header, already stored (200/409 by content), window
(412/503), size (413), disk (507), body (digest, tarball, meta.json). A
rejection leaves nothing behind; 201 is returned only after the tarball is
fsynced, linked into place, its directory fsynced and its index row fsynced.

Blocking work runs in worker threads, in as few hand-offs as the order allows:
each hand-off costs two thread switches and an event-loop wake-up, which under a
load of small uploads was a third of the receiver's CPU. A body of at most
SMALL_BODY_BYTES is received into memory and then hashed, validated, written,
installed and indexed in one hand-off; a larger one streams through BodySink
and is installed and indexed in one more.
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
from receiver.digests import (
    BodyDigest,
    DeclaredDigest,
    format_digest,
    hash_body,
    parse_content_digest,
)
from receiver.errors import (
    CommitMismatch,
    Conflict,
    IngestError,
    InsufficientStorage,
    InvalidTarball,
    TooLarge,
    UploadInFlight,
)
from receiver.gate import GateVerdict, VersionGate
from receiver.ids import check_id, normalise_commit
from receiver.index import DurabilityError, IndexRow, JsonlIndex, new_row
from receiver.limits import UploadAdmission
from receiver.locks import EpisodeLocks
from receiver.pipeline import BodySink, write_all
from receiver.store import FilesystemStore, TempBlob
from receiver.tarcheck import INLINE_BYTES, StreamValidator, TarSummary, read_meta_commit

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# Bodies up to this size (by Content-Length) are received into memory and stored in
# one thread hand-off; the tar validator checks bodies this small inline anyway.
SMALL_BODY_BYTES = INLINE_BYTES


def _as_no_space(error: OSError) -> InsufficientStorage | None:
    if error.errno in _NO_SPACE:
        return InsufficientStorage(
            "the disk filled up during the upload", headers={"Retry-After": "60"}
        )
    return None


@dataclass
class Reply:
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadHeaders:
    commit: str | None
    content_length: int | None
    content_digest: str | None


class Ingestor:
    def __init__(
        self,
        config: ReceiverConfig,
        gate: VersionGate,
        store: FilesystemStore,
        index: JsonlIndex,
        locks: EpisodeLocks,
        admission: UploadAdmission,
        on_fatal: Callable[[str], NoReturn],
    ) -> None:
        self.admission = admission
        self.config = config
        self.gate = gate
        self.store = store
        self.index = index
        self.locks = locks
        self._on_fatal = on_fatal

    # -- PUT ---------------------------------------------------------------------

    async def put(
        self, host_id: str, episode_id: str, headers: UploadHeaders, body: AsyncIterator[bytes]
    ) -> Reply:
        check_id("host_id", host_id)
        check_id("episode_id", episode_id)
        commit = self.gate.parse_header(headers.commit)
        declared = parse_content_digest(headers.content_digest)
        with self.admission.slot(host_id):
            if not self.locks.try_acquire(host_id, episode_id):
                raise UploadInFlight(
                    "another upload of this episode is in progress", headers={"Retry-After": "2"}
                )
            try:
                stored = await self._stored_row(host_id, episode_id)
                lost = stored is not None and not await self._file_present(host_id, episode_id)
                if stored is not None and not lost:
                    return await self._answer_stored(stored, declared, body)
                # A lost file (indexed, but gone from disk) is restored from the same content
                # without a second row; like a retry, it is not refused as stale.
                verdict = GateVerdict(commit, None, 0, None, None) if lost else None
                if verdict is None:
                    verdict = await self.gate.check(commit)
                self._check_size(headers.content_length)
                needed = headers.content_length or 0
                with self.admission.reservation(self.store.free_bytes(), needed):
                    return await self._receive(
                        host_id, episode_id, commit, verdict, declared, body, needed, stored
                    )
            finally:
                self.locks.release(host_id, episode_id)

    def _check_size(self, content_length: int | None) -> None:
        limit = self.config.storage.max_upload_bytes
        if content_length is not None and content_length > limit:
            raise TooLarge(f"Content-Length {content_length} exceeds max_upload_bytes ({limit})")

    async def _receive(
        self,
        host_id: str,
        episode_id: str,
        commit: str | None,
        verdict: GateVerdict,
        declared: DeclaredDigest | None,
        body: AsyncIterator[bytes],
        reserved: int,
        restore: IndexRow | None = None,
    ) -> Reply:
        if 0 < reserved <= min(SMALL_BODY_BYTES, self.config.storage.max_upload_bytes):
            data = b"".join([chunk async for chunk in body])
            row, sha256 = await asyncio.to_thread(
                self._store_small, host_id, episode_id, commit, data, declared, restore
            )
        else:
            row, sha256 = await self._store_streamed(
                host_id, episode_id, commit, declared, body, reserved, restore
            )
        if row is None:
            # Stored meanwhile by a writer that does not take our lock (a second receiver).
            stored = await self._stored_row(host_id, episode_id)
            assert stored is not None
            return self._by_content(stored, sha256)
        reply = Reply(
            201,
            {
                "status": "stored",
                "host_id": host_id,
                "episode_id": episode_id,
                "sha256": row.sha256,
                "size_bytes": row.size_bytes,
                "commit": row.commit,
                "behind_by": verdict.behind_by,
            },
        )
        _add_warning(reply, verdict)
        return reply

    def _store_small(
        self,
        host_id: str,
        episode_id: str,
        commit: str | None,
        data: bytes,
        declared: DeclaredDigest | None,
        restore: IndexRow | None,
    ) -> tuple[IndexRow | None, str]:
        """In a worker thread: a whole small body checked, then from temp file to index row.

        The checks come first, so a rejected small body never touches the disk.
        """
        digest = hash_body(data, declared)
        sha256 = digest.sha256
        summary = None
        if self.config.storage.validate != "none":
            validator = StreamValidator(self.config.storage)
            validator.feed(data)
            summary = validator.finish()
        recorded = self._checked(commit, declared, digest, summary, restore)
        blob = self.store.create_temp(host_id, episode_id, commit)
        try:
            write_all(blob.fd, [data])
        except OSError as error:
            self.store.discard(blob)
            no_space = _as_no_space(error)
            if no_space is None:
                raise
            raise no_space from error
        except BaseException:
            self.store.discard(blob)
            raise
        row = self._install_and_index(blob, sha256, len(data), recorded, restore)
        return row, sha256

    async def _store_streamed(
        self,
        host_id: str,
        episode_id: str,
        commit: str | None,
        declared: DeclaredDigest | None,
        body: AsyncIterator[bytes],
        reserved: int,
        restore: IndexRow | None,
    ) -> tuple[IndexRow | None, str]:
        """Stream the body to a temp file (written, hashed and validated in threads)."""
        storage = self.config.storage
        blob: TempBlob = await asyncio.to_thread(
            self.store.create_temp, host_id, episode_id, commit
        )
        validator = StreamValidator(storage) if storage.validate != "none" else None

        def space_check() -> None:
            # Bytes already written are gone from statvfs; only others' reservations count.
            self.admission.check_space(self.store.free_bytes(), 0, mine=reserved)

        sink = BodySink(blob.fd, validator, storage.max_upload_bytes, space_check, declared)
        try:
            try:
                async for chunk in body:
                    await sink.write(chunk)
                    failed = sink.validation_failed()
                    if failed is not None:
                        raise failed
                sha256, summary = await sink.finish()
            except OSError as error:
                no_space = _as_no_space(error)
                if no_space is None:
                    raise
                raise no_space from error
            recorded = self._checked(commit, declared, sink.digest(), summary, restore)
        except BaseException:
            await sink.abort()
            await asyncio.to_thread(self.store.discard, blob)
            raise
        # Not cancellable once started: the thread finishes, and the episode is stored.
        row = await asyncio.to_thread(
            self._install_and_index, blob, sha256, sink.size, recorded, restore
        )
        return row, sha256

    def _checked(
        self,
        header_commit: str | None,
        declared: DeclaredDigest | None,
        digest: BodyDigest,
        summary: TarSummary | None,
        restore: IndexRow | None,
    ) -> str | None:
        """The checks on a complete body; returns the commit to record."""
        if declared is not None:
            declared.check(digest)
        recorded = self._reconcile_commit(header_commit, summary)
        if restore is not None and digest.sha256 != restore.sha256:
            raise Conflict(
                "this id is indexed with different content; nothing was stored",
                fields={"stored_sha256": restore.sha256},
            )
        return recorded

    def _install_and_index(
        self,
        blob: TempBlob,
        sha256: str,
        size: int,
        recorded: str | None,
        restore: IndexRow | None,
    ) -> IndexRow | None:
        """In a worker thread: fsync, link and index a checked temp file.

        Returns None (and removes the temp file) when the final name already exists.
        A failed fsync, link or index append is fatal: the process exits for recovery.
        """
        failpoints.hit(failpoints.AFTER_TEMP_WRITE)
        try:
            installed = self.store.install(blob)
        except OSError as error:
            self._on_fatal(f"fsync/link of {blob.path} failed: {error}")
        except BaseException:
            self.store.discard(blob)
            raise
        if not installed:
            self.store.discard(blob)
            return None
        failpoints.hit(failpoints.AFTER_INSTALL)
        if restore is not None:
            row = restore
            log.warning("restored lost file of indexed episode host=%s episode=%s", *row.key)
        else:
            row = new_row(blob.host_id, blob.episode_id, sha256, size, recorded)
            try:
                row, _appended = self.index.append_if_absent(row)
            except DurabilityError as error:
                self._on_fatal(str(error))
        failpoints.hit(failpoints.AFTER_INDEX_APPEND)
        self.store.forget_temp(blob)
        failpoints.hit(failpoints.BEFORE_RESPONSE)
        return row

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

    # -- already stored ------------------------------------------------------------

    async def _stored_row(self, host_id: str, episode_id: str) -> IndexRow | None:
        """The row of a stored episode, repairing a missing row for a stored file."""
        return await asyncio.to_thread(self._stored_row_now, host_id, episode_id)

    def _stored_row_now(self, host_id: str, episode_id: str) -> IndexRow | None:
        self.index.refresh()
        row = self.index.lookup(host_id, episode_id)
        if row is not None:
            return row
        if not self.store.exists(host_id, episode_id):
            return None
        return self._repair_row(host_id, episode_id)

    def _repair_row(self, host_id: str, episode_id: str) -> IndexRow:
        """A stored file with no row (a crash between install and append): index it now."""
        sha256, size = self.store.digest(host_id, episode_id)
        commit = None
        if self.config.storage.validate == "tar":
            try:
                with self.store.final_path(host_id, episode_id).open("rb") as handle:
                    commit = normalise_commit(read_meta_commit(handle, self.config.storage) or "")
            except IngestError:
                commit = None
        row = new_row(host_id, episode_id, sha256, size, commit, backfilled=True)
        try:
            row, appended = self.index.append_if_absent(row)
        except DurabilityError as error:
            self._on_fatal(str(error))
        if appended:
            log.warning("indexed stored file that had no row: host=%s episode=%s", *row.key)
        return row

    async def _file_present(self, host_id: str, episode_id: str) -> bool:
        return await asyncio.to_thread(self.store.exists, host_id, episode_id)

    async def _answer_stored(
        self, stored: IndexRow, declared: DeclaredDigest | None, body: AsyncIterator[bytes]
    ) -> Reply:
        if declared is not None and declared.sha256 is not None:
            return self._by_content(stored, declared.sha256)
        sink = BodySink(None, None, self.config.storage.max_upload_bytes, declared=declared)
        try:
            async for chunk in body:
                await sink.write(chunk)
            sha256, _ = await sink.finish()
        except BaseException:
            await sink.abort()
            raise
        if declared is not None:
            declared.check(sink.digest())  # only a sha-512 was declared: it must match too
        return self._by_content(stored, sha256)

    @staticmethod
    def _by_content(stored: IndexRow, sha256: str) -> Reply:
        if sha256 == stored.sha256:
            return Reply(
                200,
                {
                    "status": "already-present",
                    "host_id": stored.host_id,
                    "episode_id": stored.episode_id,
                    "sha256": stored.sha256,
                    "size_bytes": stored.size_bytes,
                    "commit": stored.commit,
                },
            )
        return Reply(
            409,
            {
                "error": "conflict",
                "detail": "this id is stored with different content; nothing was overwritten",
                "stored_sha256": stored.sha256,
            },
        )

    # -- HEAD and GET /gate ----------------------------------------------------------

    async def head(self, host_id: str, episode_id: str, commit_value: str | None) -> Reply:
        check_id("host_id", host_id)
        check_id("episode_id", episode_id)
        stored = await self._stored_row(host_id, episode_id)
        if stored is not None and await self._file_present(host_id, episode_id):
            return Reply(
                200,
                headers={
                    "Repr-Digest": format_digest(stored.sha256),
                    "X-Episode-Size": str(stored.size_bytes),
                },
            )
        if stored is not None or commit_value is None:
            return Reply(404)  # a lost file is asked for again, whatever the window says
        verdict = await self.gate.check(self.gate.parse_header(commit_value))
        reply = Reply(404)
        _add_warning(reply, verdict)
        return reply

    async def gate_answer(self, commit_value: str) -> Reply:
        verdict = await self.gate.check(self.gate.parse_header(commit_value))
        reply = Reply(
            200,
            {
                "status": "accepted",
                "commit": verdict.commit,
                "behind_by": verdict.behind_by,
                "window": verdict.window,
                "head_commit": verdict.head_commit,
            },
        )
        _add_warning(reply, verdict)
        return reply


def _add_warning(reply: Reply, verdict: GateVerdict) -> None:
    if verdict.warning is not None:
        reply.body["warning"] = verdict.warning
        reply.headers["X-Commit-Behind-By"] = str(verdict.behind_by)
