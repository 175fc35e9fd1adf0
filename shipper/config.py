"""The shipper's configuration: TOML into frozen, typed objects.

Key names and defaults are part of the product contract; each key is
documented in etc/shipper.toml.example and docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from episode_common.config_loading import ConfigError, convert, read_toml, resolve_path
from episode_common.wire import DEFAULT_COMMIT_HEADER

HostId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
URL_PATTERN = re.compile(r"https?://[^\s/]+(/\S*)?")
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
PositiveSeconds = Annotated[float, Meta(gt=0)]


class RetryConfig(Struct, frozen=True, forbid_unknown_fields=True):
    base_seconds: PositiveSeconds = 1.0
    max_seconds: PositiveSeconds = 600.0
    digest_mismatch_attempts: Annotated[int, Meta(ge=1, le=100)] = 3


class RetentionConfig(Struct, frozen=True, forbid_unknown_fields=True):
    delete_after_days: Annotated[float, Meta(ge=0)] = 7.0


class ShipperConfig(Struct, frozen=True, forbid_unknown_fields=True):
    host_id: HostId
    receiver_url: str
    spool_dir: Path
    state_dir: Path
    token_file: Path | None = None
    settle_seconds: Annotated[float, Meta(ge=0)] = 10.0
    concurrency: Annotated[int, Meta(ge=1, le=64)] = 2
    commit_header: HeaderName = DEFAULT_COMMIT_HEADER
    zstd_level: Annotated[int, Meta(ge=1, le=22)] = 3
    zstd_threads: Annotated[int, Meta(ge=0, le=256)] = 0
    rescan_seconds: PositiveSeconds = 60.0
    request_timeout_seconds: PositiveSeconds = 60.0
    shutdown_grace_seconds: Annotated[float, Meta(ge=0)] = 15.0
    progress_record_seconds: PositiveSeconds = 5.0
    progress_log_seconds: PositiveSeconds = 60.0
    retry: RetryConfig = RetryConfig()
    retention: RetentionConfig = RetentionConfig()
    source: str = "<built-in>"

    @property
    def packed_dir(self) -> Path:
        """Where the shipper packs directories (the one place this path is spelled)."""
        return self.state_dir / "packed"


def from_mapping(data: dict[str, Any], source: str, base: Path) -> ShipperConfig:
    """Validate parsed TOML; relative paths are taken relative to base."""
    if "source" in data:
        raise ConfigError(source, "source", "unknown key")
    config = convert(source, {**data, "source": source}, ShipperConfig)
    if not URL_PATTERN.fullmatch(config.receiver_url):
        # Checked here, not by a pattern on the field: msgspec's message would be the regex.
        raise ConfigError(
            source,
            "receiver_url",
            f"must start with http:// or https:// and name a host, got {config.receiver_url!r}",
        )
    if config.retry.max_seconds < config.retry.base_seconds:
        raise ConfigError(source, "retry.max_seconds", "must be >= retry.base_seconds")
    config = msgspec.structs.replace(
        config,
        receiver_url=config.receiver_url.rstrip("/"),
        spool_dir=resolve_path(base, config.spool_dir),
        state_dir=resolve_path(base, config.state_dir),
        token_file=None if config.token_file is None else resolve_path(base, config.token_file),
    )
    if config.state_dir.resolve().is_relative_to(config.spool_dir.resolve()):
        # The spool watcher would see the queue's own writes as episodes changing.
        raise ConfigError(source, "state_dir", "must not be inside spool_dir")
    return config


def load_config(path: Path) -> ShipperConfig:
    """Load the shipper's config file (relative paths: relative to the file's directory)."""
    return from_mapping(read_toml(path), str(path), path.resolve().parent)


def read_token(config: ShipperConfig) -> str | None:
    """The bearer token from token_file (None without one); ConfigError when unusable."""
    if config.token_file is None:
        return None
    try:
        token = config.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            config.source, "token_file", f"cannot read {config.token_file}: {why}"
        ) from None
    if not token:
        raise ConfigError(config.source, "token_file", f"{config.token_file} is empty")
    return token
