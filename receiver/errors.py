"""Typed rejections. Domain modules raise these; app.py renders each one once.

Every error carries the HTTP status, the contract's `error` code and the extra
body fields the contract promises for it. Nothing here imports Starlette.
"""

from __future__ import annotations

from typing import Any


class IngestError(Exception):
    """A request the receiver refuses; nothing was written for it."""

    status_code: int = 400
    code: str = "bad-request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.code)
        self.detail = detail
        self.fields: dict[str, Any] = dict(fields or {})
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code}
        if self.detail is not None:
            body["detail"] = self.detail
        body.update(self.fields)
        return body


class InvalidId(IngestError):
    code = "invalid-id"


class MissingCommit(IngestError):
    code = "missing-commit"


class MalformedCommit(IngestError):
    code = "malformed-commit"


class DigestMismatch(IngestError):
    code = "digest-mismatch"


class InvalidDigest(IngestError):
    """Content-Digest cannot be parsed; unlike a mismatch, re-hashing will not fix it."""

    code = "invalid-digest"


class InvalidTarball(IngestError):
    code = "invalid-tarball"


class CommitMismatch(IngestError):
    code = "commit-mismatch"


class Unauthorized(IngestError):
    status_code = 401
    code = "unauthorized"


class Forbidden(IngestError):
    status_code = 403
    code = "forbidden"


class BodyTimeout(IngestError):
    status_code = 408
    code = "body-timeout"


class Conflict(IngestError):
    status_code = 409
    code = "conflict"


class LengthRequired(IngestError):
    status_code = 411
    code = "length-required"


class StaleCommit(IngestError):
    status_code = 412
    code = "stale-commit"


class UnknownCommit(IngestError):
    status_code = 412
    code = "unknown-commit"


class TooLarge(IngestError):
    status_code = 413
    code = "too-large"


class TooManyUploadsFromHost(IngestError):
    status_code = 429
    code = "too-many-uploads"


class UploadInFlight(IngestError):
    status_code = 423
    code = "upload-in-flight"


class GateNotReady(IngestError):
    status_code = 503
    code = "gate-not-ready"


class ServerBusy(IngestError):
    status_code = 503
    code = "server-busy"


class StorageUnavailable(IngestError):
    """A storage backend (object store, database) is down or throttling: retry later."""

    status_code = 503
    code = "storage-unavailable"


class InsufficientStorage(IngestError):
    status_code = 507
    code = "insufficient-storage"
