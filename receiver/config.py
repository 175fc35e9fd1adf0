"""The receiver's configuration: TOML into frozen, typed objects.

Key names and defaults are part of the product contract; each key is
documented in etc/receiver.toml.example and docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from episode_common.config_loading import (
    ConfigError,
    convert,
    encode_hook,
    read_toml,
    resolve_path,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveSeconds = Annotated[float, Meta(gt=0)]
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]

# The built-in answers, for a config that does not set its own. They cannot know where a
# lab's hosts keep their code, so they read it from EPISODE_CODE_DIR and stop with a message
# when that is unset, rather than run git somewhere else (`git -C ""` is the current
# directory); `&&` keeps a failed step from running the next. Labs should set their own.
_CODE_DIR = '"${EPISODE_CODE_DIR:?set EPISODE_CODE_DIR to the checkout of the lab code}"'
DEFAULT_REMEDIATION = f"""\
# This host's code is too old (or it sent no commit) for its episodes to be
# accepted. Update this host's checkout of the lab code, then re-queue the
# refused episodes:
git -C {_CODE_DIR} pull --ff-only &&
  episode-shipper retry --config /etc/episode-ingest/shipper.toml
"""
DEFAULT_REMEDIATION_UNKNOWN = f"""\
# This host's commit is not on the branch the receiver tracks (not pushed yet,
# made on another branch, or history was rewritten): updating alone does not help.
# If the commit belongs on that branch, push it from this host's checkout instead:
#   git -C "$EPISODE_CODE_DIR" push origin HEAD:main
# Otherwise put this host back on the tracked branch (main), then re-queue:
git -C {_CODE_DIR} checkout main &&
  git -C "$EPISODE_CODE_DIR" pull --ff-only &&
  episode-shipper retry --config /etc/episode-ingest/shipper.toml
"""


class ServerConfig(Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # With auth.mode = "none", binding a non-loopback address needs this explicit consent.
    allow_anonymous_remote: bool = False
    max_concurrent_uploads: Annotated[int, Meta(ge=1, le=100_000)] = 64
    max_concurrent_uploads_per_host: Annotated[int, Meta(ge=1, le=100_000)] = 4
    # A body that advances by less than 64 KiB in this long (silence, or a slow drip) gets 408
    # and its temp file is removed.
    body_timeout_seconds: PositiveSeconds = 60.0
    # On SIGTERM, in-flight uploads get this long to finish before they are aborted.
    shutdown_grace_seconds: Annotated[float, Meta(ge=0)] = 30.0


class _StorageCommon(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """The [storage] keys every backend has: local state, size cap and the body's checks."""

    data_dir: Path
    max_upload_bytes: PositiveInt = 64 * GiB
    min_free_bytes: NonNegativeInt = 1 * GiB
    validate: Literal["none", "zstd", "tar"] = "tar"
    # Caps that keep a hostile tarball (a zstd bomb) from exhausting memory or CPU.
    max_unpacked_bytes: PositiveInt = 256 * GiB
    max_window_bytes: Annotated[int, Meta(ge=1 * KiB, le=2 * GiB)] = 128 * MiB
    max_members: PositiveInt = 1_000_000


class FilesystemStorageConfig(_StorageCommon, frozen=True, tag="filesystem"):
    """[storage] type = "filesystem": tarballs under data_dir/episodes."""


class S3StorageConfig(_StorageCommon, frozen=True, kw_only=True, tag="s3"):
    """[storage] type = "s3": tarballs as objects in a bucket; data_dir keeps local state."""

    endpoint_url: Annotated[str, Meta(pattern=r"^https?://[^/]+/?$")]
    bucket: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    prefix: str = "episodes/"
    region: Annotated[str, Meta(min_length=1)] = "us-east-1"
    credentials_file: Path | None = None
    # S3 parts are 5 MiB to 5 GiB (the last may be smaller).
    part_size_bytes: Annotated[int, Meta(ge=5 * MiB, le=5 * GiB)] = 16 * MiB
    abandon_after_seconds: PositiveSeconds = 86_400.0
    # A commit marker older than this is a dead receiver's: another upload of the id may
    # take it over (a live commit holds it for one conditional create, seconds at most).
    commit_timeout_seconds: PositiveSeconds = 600.0


# Each backend's keys are their own struct, tagged by `type` (default "filesystem").
StorageConfig = FilesystemStorageConfig | S3StorageConfig
STORAGE_TYPES = ("filesystem", "s3")


class JsonlIndexConfig(
    Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="jsonl"
):
    """[index] type = "jsonl": index.jsonl in data_dir, the record, with a view beside it."""


class PostgresIndexConfig(
    Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="postgresql"
):
    """[index] type = "postgresql": one table shared by every receiver of a fleet."""

    # libpq form, e.g. "host=db dbname=episodes user=ingest"; the password comes from
    # PGPASSWORD, ~/.pgpass, or dsn_file (a file holding the whole DSN, private to us).
    dsn: str = ""
    dsn_file: Path | None = None
    table: Annotated[str, Meta(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "episodes"
    pool_size: Annotated[int, Meta(ge=1, le=1000)] = 10
    connect_timeout_seconds: PositiveSeconds = 5.0


IndexConfig = JsonlIndexConfig | PostgresIndexConfig


class GateConfig(Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    repo_path: Path | None = None
    ref: Annotated[str, Meta(min_length=1)] = "HEAD"
    window: Annotated[int, Meta(ge=1, le=1_000_000)] = 100
    refresh_seconds: PositiveSeconds = 30.0
    git_timeout_seconds: PositiveSeconds = 10.0
    # With a remote, each refresh first runs `git fetch <remote>` (ref then names a
    # remote-tracking branch, "origin/main"), so receivers on several machines follow one
    # upstream. A failed or slow fetch keeps the window, like any failed refresh.
    remote: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")] | None = None
    fetch_timeout_seconds: PositiveSeconds = 30.0
    header: HeaderName = "X-Code-Commit"
    # Answer to stale-commit and to a missing or malformed commit header.
    remediation: str = DEFAULT_REMEDIATION
    # Answer to unknown-commit: pulling does not help there.
    remediation_unknown: str = DEFAULT_REMEDIATION_UNKNOWN


class AuthConfig(Struct, frozen=True, forbid_unknown_fields=True):
    mode: Literal["none", "tokens"] = "none"
    tokens_file: Path | None = None
    # Also require a valid token (any host's) for /, /metrics and /healthz.
    protect_read_endpoints: bool = False


class ReceiverConfig(Struct, frozen=True, forbid_unknown_fields=True):
    storage: StorageConfig
    server: ServerConfig = ServerConfig()
    index: IndexConfig = JsonlIndexConfig()
    version_gate: GateConfig = GateConfig()
    auth: AuthConfig = AuthConfig()
    # Where the config came from; used in messages only.
    source: str = "<built-in>"


def _check_semantics(config: ReceiverConfig) -> None:
    gate = config.version_gate
    if gate.enabled and gate.repo_path is None:
        raise ConfigError(
            config.source, "version_gate.repo_path", "required when version_gate.enabled = true"
        )
    if config.auth.mode == "tokens" and config.auth.tokens_file is None:
        raise ConfigError(config.source, "auth.tokens_file", 'required when auth.mode = "tokens"')
    index = config.index
    if isinstance(index, PostgresIndexConfig) and bool(index.dsn) == (index.dsn_file is not None):
        raise ConfigError(config.source, "index.dsn", "give exactly one of dsn and dsn_file")
    server = config.server
    if server.max_concurrent_uploads_per_host > server.max_concurrent_uploads:
        raise ConfigError(
            config.source,
            "server.max_concurrent_uploads_per_host",
            "must be <= server.max_concurrent_uploads",
        )
    if (
        config.auth.mode == "none"
        and not is_loopback(server.host)
        and not server.allow_anonymous_remote
    ):
        raise ConfigError(
            config.source,
            "server.host",
            f'{server.host!r} is not a loopback address and auth.mode = "none": anyone on '
            'the network could upload. Use auth.mode = "tokens", or set '
            "server.allow_anonymous_remote = true to allow it explicitly",
        )


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolve_paths(config: ReceiverConfig, base: Path) -> ReceiverConfig:
    gate = config.version_gate
    auth = config.auth
    storage = msgspec.structs.replace(
        config.storage, data_dir=resolve_path(base, config.storage.data_dir)
    )
    if isinstance(storage, S3StorageConfig) and storage.credentials_file is not None:
        storage = msgspec.structs.replace(
            storage, credentials_file=resolve_path(base, storage.credentials_file)
        )
    return msgspec.structs.replace(
        config,
        storage=storage,
        version_gate=msgspec.structs.replace(
            gate,
            repo_path=None if gate.repo_path is None else resolve_path(base, gate.repo_path),
        ),
        auth=msgspec.structs.replace(
            auth,
            tokens_file=None if auth.tokens_file is None else resolve_path(base, auth.tokens_file),
        ),
        index=_resolve_index_paths(config.index, base),
    )


def _resolve_index_paths(index: IndexConfig, base: Path) -> IndexConfig:
    if isinstance(index, PostgresIndexConfig) and index.dsn_file is not None:
        return msgspec.structs.replace(index, dsn_file=resolve_path(base, index.dsn_file))
    return index


def _with_default_types(data: dict[str, Any]) -> dict[str, Any]:
    """A section without `type` is the embedded default's (a tagged union needs the tag)."""
    data = dict(data)
    for section, default in (("storage", "filesystem"), ("index", "jsonl")):
        if isinstance(data.get(section), dict) and "type" not in data[section]:
            data[section] = {**data[section], "type": default}
    return data


def from_mapping(data: dict[str, Any], source: str, base: Path) -> ReceiverConfig:
    """Validate parsed TOML; relative paths are taken relative to base."""
    if "source" in data:
        raise ConfigError(source, "source", "unknown key")
    storage = data.get("storage")
    if isinstance(storage, dict):
        kind = storage.get("type", "filesystem")
        if kind not in STORAGE_TYPES:
            listed = ", ".join(f'"{name}"' for name in STORAGE_TYPES)
            raise ConfigError(source, "storage.type", f"expected one of {listed}, got {kind!r}")
    config = convert(source, _with_default_types(data) | {"source": source}, ReceiverConfig)
    config = _resolve_paths(config, base)
    _check_semantics(config)
    return config


def load_config(path: Path) -> ReceiverConfig:
    """Load the receiver's config file (relative paths: relative to the file's directory)."""
    return from_mapping(read_toml(path), str(path), path.resolve().parent)


def with_server_overrides(config: ReceiverConfig, changed: dict[str, Any]) -> ReceiverConfig:
    """Command-line values for [server] (serve --host/--port/--workers, --dev), checked
    exactly like the same values in a file: one validation, one set of rules."""
    if not changed:
        return config
    source = f"{config.source} with command-line {', '.join(f'--{key}' for key in changed)}"
    data = msgspec.to_builtins(config, enc_hook=encode_hook)
    data["server"].update(changed)
    checked = convert(source, {**data, "source": source}, ReceiverConfig)
    _check_semantics(checked)
    return msgspec.structs.replace(checked, source=config.source)


def ensure_data_dir(config: ReceiverConfig) -> None:
    """Create data_dir if needed and prove it is writable; ConfigError otherwise."""
    data_dir = config.storage.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            config.source, "storage.data_dir", f"cannot create {data_dir}: {error.strerror}"
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(config.source, "storage.data_dir", f"{data_dir} is not writable")
