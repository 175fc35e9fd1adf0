"""What the operator tools share at the command line: one-line usage errors, where the store is.

Both tools find the store the way the receiver does: from its config (data_dir) or from
paths given on the command line. Every bad argument or path is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import msgspec

from episode_common.cli_support import fail
from episode_common.config_loading import ConfigError
from episode_common.wire import ID_RULE, is_valid_id
from receiver.config import (
    FilesystemStorageConfig,
    JsonlIndexConfig,
    StorageConfig,
    ensure_data_dir,
    load_config,
)
from receiver.storage import INDEX_NAME, Storage, open_storage, open_storage_at

EXIT_PROBLEMS = 1
# Hashing is I/O- and SHA-bound; past a handful of threads a spinning disk only seeks more.
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


@dataclass(frozen=True)
class StoreLocation:
    """The store and catalogue a tool works on, and the limits the receiver applies."""

    storage: Storage
    episodes_root: Path  # for messages and reports
    index_path: Path | None  # None: the catalogue is a database, not a file
    config: StorageConfig

    @property
    def catalogue_name(self) -> str:
        return str(self.index_path) if self.index_path is not None else "the database catalogue"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", metavar="H", help="only this host's tarballs")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"files read in parallel (default {DEFAULT_JOBS})",
    )


def check_common_arguments(prog: str, args: argparse.Namespace) -> None:
    if args.jobs < 1:
        fail(prog, "--jobs must be at least 1")
    if args.host is not None and not is_valid_id(args.host):
        fail(prog, f"--host must match {ID_RULE}")


def from_config(prog: str, config_path: Path, *, create: bool = False) -> StoreLocation:
    """The receiver's config: its backends, its validation settings (create: make data_dir,
    as the receiver itself would)."""
    try:
        config = load_config(config_path)
        if create:
            ensure_data_dir(config)
    except ConfigError as error:
        fail(prog, f"config: {error}")
    _require_dir(prog, config.storage.data_dir, "data directory")
    storage = open_storage(config)
    layout = storage.layout
    index = layout.index_path if isinstance(config.index, JsonlIndexConfig) else None
    return StoreLocation(storage, layout.episodes_dir, index, config.storage)


def from_data_dir(prog: str, data_dir: Path) -> StoreLocation:
    _require_dir(prog, data_dir, "data directory")
    storage = open_storage_at(data_dir / "episodes", data_dir / INDEX_NAME)
    config = FilesystemStorageConfig(data_dir=data_dir)
    return StoreLocation(storage, data_dir / "episodes", data_dir / INDEX_NAME, config)


def from_paths(prog: str, episodes_root: Path, index_path: Path) -> StoreLocation:
    """Explicit paths; the data_dir (for the claims file) is the episodes root's parent."""
    _require_dir(prog, episodes_root, "episodes root")
    if not index_path.parent.is_dir():
        fail(prog, f"the directory of the index {index_path} does not exist")
    if index_path.is_dir():
        fail(prog, f"index {index_path} is a directory")
    storage = open_storage_at(episodes_root, index_path)
    config = FilesystemStorageConfig(data_dir=episodes_root.parent)
    return StoreLocation(storage, episodes_root, index_path, config)


def _require_dir(prog: str, path: Path, what: str) -> None:
    if not path.is_dir():
        fail(prog, f"{what} {path} does not exist or is not a directory")


def write_json(document: object) -> None:
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    sys.stdout.flush()
