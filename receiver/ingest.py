"""Upload orchestration: the contract's checks, top to bottom, then the store path.

Order: ids, commit header, already stored (200/409 by content), window (412/503),
size (413), disk (507), body (digest, tarball, meta.json). A rejection leaves nothing
behind; 201 is returned only once the blob is durable under its final name and its
catalogue row is durable (receiver.receiving).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from episode_common.wire import format_sha256_digest
from receiver.config import ReceiverConfig
from receiver.digests import parse_content_digest
from receiver.errors import InvalidDigest, TooLarge, UploadInFlight
from receiver.gate import GateVerdict, VersionGate
from receiver.ids import check_id
from receiver.limits import UploadAdmission
from receiver.pipeline import BodySink
from receiver.receiving import Receiver, Reply, Upload
from receiver.storage import DurabilityError, IndexRow, Storage
from receiver.stored_rows import row_for_stored_blob

log = logging.getLogger(__name__)

__all__ = ["Ingestor", "Reply", "Upload"]


class Ingestor:
    def __init__(
        self,
        config: ReceiverConfig,
        gate: VersionGate,
        storage: Storage,
        admission: UploadAdmission,
        on_fatal: Callable[[str], NoReturn],
    ) -> None:
        self.config = config
        self.gate = gate
        self.storage = storage
        self.admission = admission
        self._on_fatal = on_fatal
        self._receiver = Receiver(config, storage, admission, on_fatal)

    # -- PUT ---------------------------------------------------------------------

    async def put(self, upload: Upload) -> Reply:
        check_id("host_id", upload.host_id)
        check_id("episode_id", upload.episode_id)
        upload.commit = self.gate.parse_header(upload.sent_commit)
        with self.admission.slot(upload.host_id), self._claimed(upload):
            stored = await self._look_up_or_repair(upload)
            if stored is not None:
                return await self._answer_stored(stored, upload)
            # A restore (indexed, blob gone) is sent again with the same content; like a
            # retry, it is not refused as stale.
            verdict = None if upload.restore else await self.gate.check(upload.commit)
            self._check_size(upload.content_length)
            upload.reserved = upload.content_length or 0
            with self.admission.reservation(self._free_bytes(), upload.reserved):
                upload.declared = parse_content_digest(upload.content_digest)
                return await self._store(upload, verdict)

    @contextmanager
    def _claimed(self, upload: Upload) -> Iterator[None]:
        catalogue, key = self.storage.catalogue, (upload.host_id, upload.episode_id)
        if not catalogue.claim(*key):
            raise UploadInFlight(
                "another upload of this episode is in progress", headers={"Retry-After": "2"}
            )
        try:
            yield
        finally:
            catalogue.release(*key)

    def _check_size(self, content_length: int | None) -> None:
        limit = self.config.storage.max_upload_bytes
        if content_length is not None and content_length > limit:
            raise TooLarge(f"Content-Length {content_length} exceeds max_upload_bytes ({limit})")

    def _free_bytes(self) -> int | None:
        return self.storage.blobs.free_bytes()

    async def _store(self, upload: Upload, verdict: GateVerdict | None) -> Reply:
        row, sha256 = await self._receiver.receive(upload)
        if row is None:
            # Stored meanwhile by a writer that does not take our claim (a second receiver).
            stored = await self._look_up_or_repair(upload)
            assert stored is not None
            return _by_content(stored, sha256)
        body = {
            "status": "stored",
            "host_id": row.host_id,
            "episode_id": row.episode_id,
            "sha256": row.sha256,
            "size_bytes": row.size_bytes,
            "commit": row.commit,
            "behind_by": verdict.behind_by if verdict is not None else None,
        }
        return _with_warning(Reply(201, body), verdict)

    # -- already stored ------------------------------------------------------------

    async def _look_up_or_repair(self, upload: Upload) -> IndexRow | None:
        """The row of a stored episode, in one thread hand-off.

        Writes a row when the blob is stored but has none (a crash between the two), and
        notes in upload.restore a row whose blob is gone (so the upload restores it).
        """
        return await asyncio.to_thread(self._look_up_or_repair_now, upload)

    def _look_up_or_repair_now(self, upload: Upload) -> IndexRow | None:
        key = (upload.host_id, upload.episode_id)
        row = self.storage.catalogue.lookup(*key)
        present = self.storage.blobs.exists(*key)
        if row is not None and not present:
            upload.restore = row
            return None
        if row is None and present:
            return self._repair_row(*key)
        return row

    def _repair_row(self, host_id: str, episode_id: str) -> IndexRow:
        """A stored blob with no row: index it now, its commit read from meta.json."""
        storage = self.storage
        row = row_for_stored_blob(storage.blobs, self.config.storage, host_id, episode_id)
        try:
            row, appended = storage.catalogue.append_if_absent(row)
        except DurabilityError as error:
            self._on_fatal(str(error))
        if appended:
            log.warning("indexed stored blob that had no row: host=%s episode=%s", *row.key)
        return row

    async def _answer_stored(self, stored: IndexRow, upload: Upload) -> Reply:
        """200 or 409 by content; the body is read only when no usable sha-256 was declared."""
        try:
            declared = parse_content_digest(upload.content_digest)
        except InvalidDigest:
            declared = None  # by content, whatever the header says
        if declared is not None and declared.sha256 is not None:
            return _by_content(stored, declared.sha256)
        sink = BodySink(None, None, self.config.storage.max_upload_bytes, declared=declared)
        try:
            async for chunk in upload.body:
                await sink.write(chunk)
            sha256, _ = await sink.finish()
        except BaseException:
            await sink.abort()
            raise
        if declared is not None:
            declared.check(sink.digest())  # only a sha-512 was declared: it must match too
        return _by_content(stored, sha256)

    # -- HEAD and GET /gate ----------------------------------------------------------

    async def head(self, host_id: str, episode_id: str, commit_value: str | None) -> Reply:
        check_id("host_id", host_id)
        check_id("episode_id", episode_id)
        probe = Upload(host_id, episode_id, commit_value)
        stored = await self._look_up_or_repair(probe)
        if stored is not None:
            headers = {
                "Repr-Digest": format_sha256_digest(stored.sha256),
                "X-Episode-Size": str(stored.size_bytes),
            }
            return Reply(200, headers=headers)
        if probe.restore is not None or commit_value is None:
            return Reply(404)  # a lost blob is asked for again, whatever the window says
        verdict = await self.gate.check(self.gate.parse_header(commit_value))
        return _with_warning(Reply(404), verdict)

    async def gate_answer(self, commit_value: str) -> Reply:
        verdict = await self.gate.check(self.gate.parse_header(commit_value))
        body = {
            "status": "accepted",
            "commit": verdict.commit,
            "behind_by": verdict.behind_by,
            "window": verdict.window,
            "head_commit": verdict.head_commit,
        }
        return _with_warning(Reply(200, body), verdict)


def _by_content(stored: IndexRow, sha256: str) -> Reply:
    if sha256 == stored.sha256:
        body = {
            "status": "already-present",
            "host_id": stored.host_id,
            "episode_id": stored.episode_id,
            "sha256": stored.sha256,
            "size_bytes": stored.size_bytes,
            "commit": stored.commit,
        }
        return Reply(200, body)
    body = {
        "error": "conflict",
        "detail": "this id is stored with different content; nothing was overwritten",
        "stored_sha256": stored.sha256,
    }
    return Reply(409, body)


def _with_warning(reply: Reply, verdict: GateVerdict | None) -> Reply:
    if verdict is not None and verdict.warning is not None:
        reply.body["warning"] = verdict.warning
        reply.headers["X-Commit-Behind-By"] = str(verdict.behind_by)
    return reply
