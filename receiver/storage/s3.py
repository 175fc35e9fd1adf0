"""Blobs as objects in an S3 bucket: `<prefix><host_id>/<episode_id>.tar.zst`, never overwritten.

Each object carries its sha256 in the user metadata `sha256` (and the token of the upload
that wrote it, so recovery can tell its own). Helper objects live under `<prefix>.commit/`
(commit markers) and `<prefix>.staging/`; ids never start with a dot, so they cannot clash.
Every upload is noted in a local journal first; start-up cleans up after those a crash cut
short, and aborts any multipart upload under the prefix older than abandon_after_seconds.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, cast

from episode_common.wire import TARBALL_SUFFIX, is_valid_id
from receiver.config import S3StorageConfig
from receiver.storage.base import StoredBlob, Stray
from receiver.storage.hashing import digest_stream
from receiver.storage.layout import DataDirLayout
from receiver.storage.s3_client import NotFound, PreconditionFailed, make_client, translated
from receiver.storage.s3_journal import Attempt, UploadJournal
from receiver.storage.s3_writer import S3Writer

log = logging.getLogger(__name__)


class S3Store:
    """See BlobStore. The client is made on first use, so opening costs no request."""

    def __init__(self, config: S3StorageConfig, layout: DataDirLayout) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.part_size = config.part_size_bytes
        self.journal = UploadJournal(layout.data_dir / "s3-uploads.journal")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    # -- names ---------------------------------------------------------------------

    def key(self, host_id: str, episode_id: str) -> str:
        return f"{self.prefix}{host_id}/{episode_id}{TARBALL_SUFFIX}"

    def marker_key(self, attempt: Attempt) -> str:
        return f"{self.prefix}.commit/{attempt.host_id}/{attempt.episode_id}"

    def staging_key(self, token: str) -> str:
        return f"{self.prefix}.staging/{token}"

    def where_key(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @staticmethod
    def metadata(sha256: str | None, token: str) -> dict[str, str]:
        return {"sha256": sha256 or "", "upload-token": token}

    # -- the write path's calls (each translated) -------------------------------------

    def _call(self, what: str, operation: str, **kwargs: Any) -> Any:
        with translated(f"{what} {kwargs.get('Key', self.bucket)}"):
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)

    def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        answer = self._call("create upload", "create_multipart_upload", Key=key, Metadata=metadata)
        return str(answer["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, body: bytearray) -> str:
        answer = self._call(
            "upload part", "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return str(answer["ETag"])

    def complete(
        self, key: str, upload_id: str, parts: list[dict[str, Any]], *, if_absent: bool
    ) -> bool:
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call(
                "complete upload",
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            )
        except PreconditionFailed:
            return False
        return True

    def put_if_absent(self, key: str, body: bytearray, metadata: dict[str, str]) -> bool:
        try:
            self._call("put", "put_object", Key=key, Body=body, Metadata=metadata, IfNoneMatch="*")
        except PreconditionFailed:
            return False
        return True

    def copy_if_absent(self, source: str, key: str, metadata: dict[str, str]) -> bool:
        """A server-side copy of source under key with this metadata, if key is absent."""
        size = int(self._call("head", "head_object", Key=source)["ContentLength"])
        upload_id = self.create_multipart(key, metadata)
        parts = []
        for number, start in enumerate(range(0, max(size, 1), self.part_size), start=1):
            end = min(start + self.part_size, size) - 1
            answer = self._call(
                "copy part",
                "upload_part_copy",
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
        if self.complete(key, upload_id, parts, if_absent=True):
            return True
        self._abort_upload(key, upload_id)
        return False

    def take_marker(self, attempt: Attempt) -> bool:
        """Hold the key's commit marker (If-None-Match: *); False if another upload holds it."""
        key = self.marker_key(attempt)
        self.journal.created(attempt.token, key)
        return self.put_if_absent(key, bytearray(attempt.token.encode()), {})

    def clear_stale_marker(self, attempt: Attempt) -> bool:
        """Delete the key's marker when it is older than commit_timeout_seconds: the upload
        that took it died between the marker and the object (its own restart would clean
        it up too, but the id must not wait for that). True when one was cleared."""
        key = self.marker_key(attempt)
        try:
            head = self._call("head", "head_object", Key=key)
        except NotFound:
            return True  # released meanwhile: try again
        age = datetime.now(UTC) - head["LastModified"]
        if age < timedelta(seconds=self.config.commit_timeout_seconds):
            return False
        log.warning("took over the commit marker of a dead upload: %s", self.where_key(key))
        self.delete(key)
        return True

    def delete(self, key: str) -> None:
        self._call("delete", "delete_object", Key=key)

    def clean_up(
        self, attempt: Attempt, upload_key: str | None, upload_id: str | None, marker: bool
    ) -> None:
        """What one failed attempt left: its multipart upload, staging object, marker."""
        if upload_key is not None and upload_id is not None:
            self._abort_upload(upload_key, upload_id)
        if upload_key == self.staging_key(attempt.token):
            self.delete(upload_key)
        if marker:
            self.delete(self.marker_key(attempt))

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort upload", "abort_multipart_upload", Key=key, UploadId=upload_id)
        except NotFound:
            pass  # aborted or completed already

    # -- BlobStore -----------------------------------------------------------------

    def prepare(self) -> None:
        pass  # a bucket is not made by the receiver; checks.check_storage proves it is there

    def open_writer(
        self, host_id: str, episode_id: str, commit: str | None, sha256: str | None = None
    ) -> S3Writer:
        attempt = Attempt(secrets.token_hex(12), host_id, episode_id, commit)
        self.journal.begin(attempt)
        return S3Writer(self, attempt, sha256)

    def _head(self, host_id: str, episode_id: str) -> dict[str, Any] | None:
        try:
            head = self._call("head", "head_object", Key=self.key(host_id, episode_id))
        except NotFound:
            return None
        return cast(dict[str, Any], head)

    def exists(self, host_id: str, episode_id: str) -> bool:
        return self._head(host_id, episode_id) is not None

    def where(self, host_id: str, episode_id: str) -> str:
        return self.where_key(self.key(host_id, episode_id))

    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]:
        """From the object's metadata (no download); re-hashed only if that has no sha256."""
        head = self._head(host_id, episode_id)
        if head is None:
            raise FileNotFoundError(self.where(host_id, episode_id))
        sha256 = str(head.get("Metadata", {}).get("sha256", ""))
        if len(sha256) == 64:
            return sha256, int(head["ContentLength"])
        with self.open_read(host_id, episode_id) as handle:
            return digest_stream(handle)

    def open_read(self, host_id: str, episode_id: str) -> BinaryIO:
        try:
            answer = self._call("get", "get_object", Key=self.key(host_id, episode_id))
        except NotFound:
            raise FileNotFoundError(self.where(host_id, episode_id)) from None
        return cast(BinaryIO, answer["Body"])

    def scan_blobs(self, host_id: str | None = None) -> Iterator[StoredBlob | Stray]:
        start = self.prefix if host_id is None else f"{self.prefix}{host_id}/"
        for item in self._pages("list", "list_objects_v2", "Contents", Prefix=start):
            found = self._classify(str(item["Key"]), int(item["Size"]))
            if found is not None:
                yield found

    def _classify(self, key: str, size: int) -> StoredBlob | Stray | None:
        rest = key[len(self.prefix) :]
        if rest.startswith((".commit/", ".staging/")):
            return None  # the receiver's own helpers, cleaned up by recover()
        host_id, _, name = rest.partition("/")
        episode_id = name.removesuffix(TARBALL_SUFFIX)
        where = self.where_key(key)
        if not is_valid_id(host_id) or "/" in name:
            return Stray(where, "not <host_id>/<name> under prefix")
        if not name.endswith(TARBALL_SUFFIX):
            return Stray(where, f"name does not end in {TARBALL_SUFFIX}")
        if not is_valid_id(episode_id):
            return Stray(where, "name is not a valid episode id")
        return StoredBlob(host_id, episode_id, size, where)

    def _list(self, what: str, operation: str, field: str, **kwargs: Any) -> list[dict[str, Any]]:
        return list(self._pages(what, operation, field, **kwargs))

    def _pages(
        self, what: str, operation: str, field: str, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        """The items of a paginated listing, one page in memory at a time."""
        with translated(f"{what} {kwargs.get('Prefix', '')}"):
            pages = self.client.get_paginator(operation).paginate(Bucket=self.bucket, **kwargs)
            for page in pages:
                yield from page.get(field, [])

    def recover(self) -> list[StoredBlob]:
        """Clean up after this data_dir's earlier runs (its journal), then after anyone's
        abandoned uploads; returns the blobs committed whose row may be missing."""
        committed: list[Attempt] = []
        for attempt in self.journal.unfinished():
            if self._committed(attempt):
                committed.append(attempt)
            self._clean_attempt(attempt)
        self.journal.rewrite([])  # the committed are in `committed`; forget_note needs no line
        self._abort_abandoned()
        return [self._stored(attempt) for attempt in committed]

    def _committed(self, attempt: Attempt) -> bool:
        head = self._head(attempt.host_id, attempt.episode_id)
        return head is not None and head.get("Metadata", {}).get("upload-token") == attempt.token

    def _stored(self, attempt: Attempt) -> StoredBlob:
        host_id, episode_id = attempt.host_id, attempt.episode_id
        _, size = self.digest(host_id, episode_id)
        where = self.where(host_id, episode_id)
        return StoredBlob(host_id, episode_id, size, where, attempt.commit, attempt.token)

    def _clean_attempt(self, attempt: Attempt) -> None:
        for key, upload_id in attempt.uploads:
            self._abort_upload(key, upload_id)
            log.info("aborted multipart upload left by an earlier run: %s", self.where_key(key))
        for key in attempt.objects:
            if key == self.marker_key(attempt) and not self._holds(key, attempt.token):
                continue  # another upload's marker: not ours to drop
            self.delete(key)

    def _holds(self, key: str, token: str) -> bool:
        try:
            body = self._call("get", "get_object", Key=key)["Body"]
        except NotFound:
            return False
        with body:
            return bool(body.read() == token.encode())

    def _abort_abandoned(self) -> None:
        """Multipart uploads and helpers older than abandon_after_seconds: no live receiver
        is still writing them (a younger one may be another receiver's, in progress)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.config.abandon_after_seconds)
        uploads = self._list("list", "list_multipart_uploads", "Uploads", Prefix=self.prefix)
        for upload in uploads:
            if upload["Initiated"] < cutoff:
                self._abort_upload(str(upload["Key"]), str(upload["UploadId"]))
                log.warning("aborted abandoned multipart upload %s", self.where_key(upload["Key"]))
        for helper in (".commit/", ".staging/"):
            where = self.prefix + helper
            for item in self._list("list", "list_objects_v2", "Contents", Prefix=where):
                if item["LastModified"] < cutoff:
                    self.delete(str(item["Key"]))
                    log.warning("deleted abandoned %s", self.where_key(item["Key"]))

    def forget_note(self, blob: StoredBlob) -> None:
        pass  # recover() already dropped the note: the row is repaired from the object

    def free_bytes(self) -> int | None:
        return None

    def unready_reason(self, min_free_bytes: int) -> str | None:
        try:
            self._call("head bucket", "head_bucket")
        except Exception as error:  # noqa: BLE001 - any failure is the reason, in one line
            return f"storage: s3://{self.bucket}: {error}"
        return None
