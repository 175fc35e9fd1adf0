"""The S3 client for the s3 backend: credentials, one boto3 client, and the one place where
botocore's exceptions become ours (BackendUnavailable, StoreRefused, PreconditionFailed).

boto3 was chosen by measurement (docs/dependencies.md): its calls block, and every caller of
a BlobStore already runs in a worker thread.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from receiver.config import S3StorageConfig
from receiver.storage.base import BackendUnavailable

_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, reset, timeouts, closed mid-response
    botocore.exceptions.HTTPClientError,
)


class CredentialsError(Exception):
    """The credentials cannot be used; str() names the key and why."""


class StoreRefused(BackendUnavailable):
    """The store answered but refused (access denied, no such bucket): a person must look,
    yet an upload is still answered 503, since fixing it makes the retry succeed."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, retry_after_seconds=60)
        self.code = code


class PreconditionFailed(Exception):
    """If-None-Match: * failed: the key exists (or is being created)."""


class NotFound(Exception):
    """No such key (or upload)."""


def load_credentials(config: S3StorageConfig) -> tuple[str, str]:
    """(access key id, secret) from credentials_file, else the AWS_* environment."""
    path = config.credentials_file
    if path is None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise CredentialsError(
                "storage.credentials_file: not set, and AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY are not both in the environment"
            )
        return key, secret
    return _read_credentials_file(path)


def _read_credentials_file(path: Path) -> tuple[str, str]:
    where = f"storage.credentials_file: {path}"
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            mode_text = f"{mode & 0o777:o}"
            raise CredentialsError(f"{where} is group- or world-readable ({mode_text}); chmod 600")
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise CredentialsError(f"{where}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CredentialsError(f"{where}: not valid TOML: {error}") from None
    values = [data.get(name) for name in ("access_key_id", "secret_access_key")]
    for name, value in zip(("access_key_id", "secret_access_key"), values, strict=True):
        if not isinstance(value, str) or not value:
            raise CredentialsError(f"{where}: {name} is missing or not a string")
    return values[0], values[1]  # type: ignore[return-value]


def make_client(config: S3StorageConfig) -> Any:
    """A boto3 S3 client for the config (thread-safe; one per store)."""
    key, secret = load_credentials(config)
    options = Config(
        s3={"addressing_style": "path"},
        # Checksums only where S3 requires them: the body is hashed by the receiver already.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=64,
    )
    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=options,
    )


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Run one S3 call; its failures become PreconditionFailed, NotFound or BackendUnavailable."""
    try:
        yield
    except botocore.exceptions.ClientError as error:
        raise _from_client_error(what, error) from error
    except _CONNECTION_ERRORS as error:
        raise BackendUnavailable(f"object store unreachable ({what}): {error}") from error


def _from_client_error(what: str, error: botocore.exceptions.ClientError) -> Exception:
    response: dict[str, Any] = error.response
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    code = str(response.get("Error", {}).get("Code", status))
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailed(what)
    if code == "ConditionalRequestConflict" or status == 409 and what.startswith("complete"):
        return PreconditionFailed(what)  # AWS: a concurrent conditional write is under way
    if status == 404 and code in ("404", "NoSuchKey", "NoSuchUpload", "NotFound"):
        return NotFound(what)
    if status >= 500 or code in _THROTTLED:
        return BackendUnavailable(f"object store answered {status} {code} ({what})")
    return StoreRefused(f"object store refused {what}: {status} {code}", code)


def probe(config: S3StorageConfig) -> tuple[str, bool] | None:
    """None when the bucket answers to these credentials; else (one line naming the key,
    whether retrying later may help: the store unreachable or 5xx)."""
    try:
        client = make_client(config)
        with translated(f"bucket {config.bucket!r}"):
            client.head_bucket(Bucket=config.bucket)
            client.list_objects_v2(Bucket=config.bucket, Prefix=config.prefix, MaxKeys=1)
    except CredentialsError as error:
        return str(error), False
    except StoreRefused as error:
        return _refusal(config, error), False
    except (NotFound, PreconditionFailed):
        return f"storage.bucket: no bucket {config.bucket!r} at {config.endpoint_url}", False
    except BackendUnavailable as error:
        return f"storage.endpoint_url: {error}", True
    return None


def _refusal(config: S3StorageConfig, error: StoreRefused) -> str:
    if error.code in ("NoSuchBucket", "404"):
        return f"storage.bucket: no bucket {config.bucket!r} at {config.endpoint_url}"
    source = (
        "storage.credentials_file"
        if config.credentials_file is not None
        else "storage.credentials_file (unset: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )
    return f"{source}: the store refused these credentials for bucket {config.bucket!r}: {error}"
