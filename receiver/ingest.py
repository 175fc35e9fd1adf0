"""Upload orchestration: the contract's checks in order, then the durable store path.

Order: ids, commit header, already stored (200/409 by content), window
(412/503), size (413), disk (507), body (digest, tarball, meta.json). A
rejection leaves nothing behind; 201 is returned only after the tarball is
fsynced, linked into place, its directory fsynced and its index row fsynced.
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
from receiver.digests import format_digest, parse_content_digest
from receiver.errors import (
    CommitMismatch,
    Conflict,
    DigestMismatch,
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
from receiver.pipeline import BodySink
from receiver.store import FilesystemStore, TempBlob
from receiver.tarcheck import StreamValidator, read_meta_commit

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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
        declared: str | None,
        body: AsyncIterator[bytes],
        reserved: int,
        restore: IndexRow | None = None,
    ) -> Reply:
        storage = self.config.storage
        blob: TempBlob = await asyncio.to_thread(
            self.store.create_temp, host_id, episode_id, commit
        )
        validator = StreamValidator(storage) if storage.validate != "none" else None

        def space_check() -> None:
            # Bytes already written are gone from statvfs; only others' reservations count.
            self.admission.check_space(self.store.free_bytes(), 0, mine=reserved)

        sink = BodySink(blob.fd, validator, storage.max_upload_bytes, space_check)
        try:
            try:
                async for chunk in body:
                    await sink.write(chunk)
                    failed = sink.validation_failed()
                    if failed is not None:
                        raise failed
                sha256, summary = await sink.finish()
            except OSError as error:
                if error.errno in _NO_SPACE:
                    raise InsufficientStorage(
                        "the disk filled up during the upload", headers={"Retry-After": "60"}
                    ) from error
                raise
            if declared is not None and declared != sha256:
                raise DigestMismatch(
                    f"Content-Digest says sha-256 {declared}, the body has {sha256}"
                )
            recorded = self._reconcile_commit(commit, summary.meta_commit if summary else None)
            if restore is not None and sha256 != restore.sha256:
                raise Conflict(
                    "this id is indexed with different content; nothing was stored",
                    fields={"stored_sha256": restore.sha256},
                )
            failpoints.hit(failpoints.AFTER_TEMP_WRITE)
            try:
                installed = await asyncio.to_thread(self.store.install, blob)
            except OSError as error:
                self._on_fatal(f"fsync/link of {blob.path} failed: {error}")
        except BaseException:
            await sink.abort()
            await asyncio.to_thread(self.store.discard, blob)
            raise
        if not installed:
            # Stored meanwhile by a writer that does not take our lock (a second receiver).
            await asyncio.to_thread(self.store.discard, blob)
            stored = await self._stored_row(host_id, episode_id)
            assert stored is not None
            return self._by_content(stored, sha256)
        failpoints.hit(failpoints.AFTER_INSTALL)
        if restore is not None:
            row = restore
            log.warning("restored lost file of indexed episode host=%s episode=%s", *row.key)
        else:
            row = new_row(host_id, episode_id, sha256, sink.size, recorded)
            try:
                row, _appended = await asyncio.to_thread(self.index.append_if_absent, row)
            except DurabilityError as error:
                self._on_fatal(str(error))
        failpoints.hit(failpoints.AFTER_INDEX_APPEND)
        await asyncio.to_thread(self.store.forget_temp, blob)
        failpoints.hit(failpoints.BEFORE_RESPONSE)
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

    @staticmethod
    def _reconcile_commit(header: str | None, meta_value: str | None) -> str | None:
        """The commit to record; meta.json must agree with the header when both exist."""
        if meta_value is None:
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
        await asyncio.to_thread(self.index.refresh)
        row = self.index.lookup(host_id, episode_id)
        if row is not None:
            return row
        if not await asyncio.to_thread(self.store.exists, host_id, episode_id):
            return None
        return await asyncio.to_thread(self._repair_row, host_id, episode_id)

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
        self, stored: IndexRow, declared: str | None, body: AsyncIterator[bytes]
    ) -> Reply:
        if declared is not None:
            return self._by_content(stored, declared)
        sink = BodySink(None, None, self.config.storage.max_upload_bytes)
        try:
            async for chunk in body:
                await sink.write(chunk)
            sha256, _ = await sink.finish()
        except BaseException:
            await sink.abort()
            raise
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
