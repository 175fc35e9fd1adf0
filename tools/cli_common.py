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
from receiver.config import StorageConfig, load_config
from receiver.errors import InvalidId
from receiver.ids import check_id
from receiver.store import FilesystemStore

INDEX_NAME = "index.jsonl"
EPISODE_LOCK_NAME = "episodes.lock"
EXIT_PROBLEMS = 1
# Hashing is I/O- and SHA-bound; past a handful of threads a spinning disk only seeks more.
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


@dataclass(frozen=True)
class StoreLocation:
    """The tarball tree, the catalogue and the limits the receiver applies to both."""

    store: FilesystemStore
    index_path: Path
    storage: StorageConfig

    @property
    def episodes_root(self) -> Path:
        return self.store.episodes_dir

    @property
    def episode_lock_path(self) -> Path:
        # The receiver keeps its per-episode locks beside episodes/, in its data_dir.
        return self.store.data_dir / EPISODE_LOCK_NAME


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
    if args.host is not None:
        try:
            check_id("--host", args.host)
        except InvalidId as error:
            fail(prog, str(error))


def from_config(prog: str, config_path: Path) -> StoreLocation:
    """The receiver's config: episodes and index under its data_dir, its validation settings."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        fail(prog, f"config: {error}")
    return from_data_dir(prog, config.storage.data_dir, config.storage)


def from_data_dir(prog: str, data_dir: Path, storage: StorageConfig | None = None) -> StoreLocation:
    if not data_dir.is_dir():
        fail(prog, f"data directory {data_dir} does not exist or is not a directory")
    storage = storage or StorageConfig(data_dir=data_dir)
    return StoreLocation(FilesystemStore(data_dir), data_dir / INDEX_NAME, storage)


def from_paths(prog: str, episodes_root: Path, index_path: Path) -> StoreLocation:
    """Explicit paths; the data_dir (for the lock file) is the episodes root's parent."""
    if not episodes_root.is_dir():
        fail(prog, f"episodes root {episodes_root} does not exist or is not a directory")
    if not index_path.parent.is_dir():
        fail(prog, f"the directory of the index {index_path} does not exist")
    if index_path.is_dir():
        fail(prog, f"index {index_path} is a directory")
    data_dir = episodes_root.parent
    store = FilesystemStore(data_dir, episodes_dir=episodes_root)
    return StoreLocation(store, index_path, StorageConfig(data_dir=data_dir))


def write_json(document: object) -> None:
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    sys.stdout.flush()
