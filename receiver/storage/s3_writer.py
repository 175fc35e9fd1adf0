"""One upload into the bucket: never visible until complete, created only if absent.

Up to one part is sent as a single PUT at commit; above that, each part is sent as it
fills, from one reused part buffer (the receiving side keeps streaming into the pipeline's
batches meanwhile, so memory per upload stays under two parts). The object is
created with If-None-Match: * while this writer holds the key's commit marker, itself
created with If-None-Match: * (a plain PUT, which every server we know arbitrates
atomically, unlike some servers' CompleteMultipartUpload). Without a declared sha256 the
parts go to a staging object that is copied (server-side) under the final name at commit,
since an object's metadata is fixed when its upload starts.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from receiver.storage.base import BackendUnavailable
from receiver.storage.s3_client import NotFound, PreconditionFailed
from receiver.storage.s3_journal import Attempt

if TYPE_CHECKING:
    from receiver.storage.s3 import S3Store

log = logging.getLogger(__name__)


class S3Writer:
    """See BlobWriter. write() runs in a worker thread and sends a full part itself."""

    def __init__(self, store: S3Store, attempt: Attempt, sha256: str | None) -> None:
        self._store = store
        self._attempt = attempt
        self._key = store.key(attempt.host_id, attempt.episode_id)
        self._sha256 = sha256
        self._hasher = hashlib.sha256() if sha256 is None else None
        self._buffer = bytearray(store.part_size)
        self._fill = 0  # bytes in the buffer
        self._upload_key: str | None = None  # where the parts go: the final key or staging
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._marker = False  # whether we hold the key's commit marker

    @property
    def where(self) -> str:
        return self._store.where_key(self._key)

    def write(self, chunks: list[bytes]) -> None:
        part_size = self._store.part_size
        for chunk in chunks:
            if self._hasher is not None:
                self._hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                if self._fill == part_size:
                    self._send_part()
                take = min(len(view), part_size - self._fill)
                self._buffer[self._fill : self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]

    def _send_part(self) -> None:
        """Send the buffer as the next part; it is reused once the server has it."""
        if self._upload_id is None:
            self._start_multipart()
        assert self._upload_key is not None and self._upload_id is not None
        number = len(self._parts) + 1
        etag = self._store.upload_part(self._upload_key, self._upload_id, number, self._filled())
        self._parts.append({"PartNumber": number, "ETag": etag})
        self._fill = 0

    def _start_multipart(self) -> None:
        store, token = self._store, self._attempt.token
        self._upload_key = self._key if self._sha256 is not None else store.staging_key(token)
        metadata = store.metadata(self._sha256, token) if self._sha256 is not None else {}
        self._upload_id = store.create_multipart(self._upload_key, metadata)
        store.journal.upload(token, self._upload_key, self._upload_id)

    def _filled(self) -> bytearray:
        """The buffer as a body: whole, or cut to its fill (only the last part is short)."""
        if self._fill < len(self._buffer):
            del self._buffer[self._fill :]  # in place, no copy; nothing is written after it
        return self._buffer

    def commit(self) -> bool:
        store = self._store
        sha256 = self._hasher.hexdigest() if self._hasher is not None else self._sha256
        assert sha256 is not None
        if self._upload_id is not None and self._fill:
            self._send_part()
        self._marker = store.take_marker(self._attempt)
        if not self._marker and store.clear_stale_marker(self._attempt):
            self._marker = store.take_marker(self._attempt)
        if not self._marker:
            self.abort()
            if store.exists(self._attempt.host_id, self._attempt.episode_id):
                return False
            raise BackendUnavailable("another upload of this episode is being committed", 5)
        try:
            created = self._create(sha256)
        except BaseException:
            self.abort()
            raise
        if not created:
            self.abort()
            return False
        self._upload_id = None
        store.delete(store.marker_key(self._attempt))
        return True

    def _create(self, sha256: str) -> bool:
        """The object under its final name, if absent; False if that name is taken."""
        store, metadata = self._store, self._store.metadata(sha256, self._attempt.token)
        if self._upload_id is None:
            return store.put_if_absent(self._key, self._filled(), metadata)
        assert self._upload_key is not None
        if self._upload_key == self._key:
            return store.complete(self._key, self._upload_id, self._parts, if_absent=True)
        # Staging (no digest was declared): complete it, then copy it under the final name.
        store.complete(self._upload_key, self._upload_id, self._parts, if_absent=False)
        store.journal.created(self._attempt.token, self._upload_key)
        self._upload_id = None
        created = store.copy_if_absent(self._upload_key, self._key, metadata)
        store.delete(self._upload_key)
        return created

    def close(self) -> None:
        """The row is durable: the journal may forget this upload."""
        self._buffer = bytearray()
        self._store.journal.end(self._attempt.token)

    def abort(self) -> None:
        """Abort the multipart upload, drop helper objects; the journal keeps what failed."""
        self._buffer = bytearray()
        try:
            self._store.clean_up(self._attempt, self._upload_key, self._upload_id, self._marker)
        except (BackendUnavailable, NotFound, PreconditionFailed) as error:
            log.warning("abort of %s left work for the next start: %s", self.where, error)
            return
        self._upload_id, self._marker = None, False
        self._store.journal.end(self._attempt.token)
