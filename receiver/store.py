"""Blob store for tarballs: uploads go to a temp file, then are installed without overwrite.

Layout: <data_dir>/episodes/<host>/<id>.tar.zst (final) and
<data_dir>/tmp/<host>/<id>~<commit>~<random>.part (in progress). Install is
link(temp, final): it fails rather than replace an existing file. The temp name
stays until the index row is written, so after a crash it tells recovery which
installed file may still lack its row, and with which commit.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from episode_common.durable import fsync_dir, make_dirs_durable
from receiver import failpoints

log = logging.getLogger(__name__)

SUFFIX = ".tar.zst"
READ_BLOCK = 1024 * 1024


@dataclass
class TempBlob:
    """An upload being written; fd is open for writing."""

    host_id: str
    episode_id: str
    path: Path
    fd: int


@dataclass(frozen=True)
class Intent:
    """An installed file whose index row may be missing (found in tmp/ at start)."""

    host_id: str
    episode_id: str
    commit: str | None
    temp_path: Path


class BlobStore(Protocol):
    """The seam for blob backends (a local filesystem today; object storage later)."""

    def exists(self, host_id: str, episode_id: str) -> bool: ...
    def create_temp(self, host_id: str, episode_id: str, commit: str | None) -> TempBlob: ...
    def install(self, blob: TempBlob) -> bool: ...
    def discard(self, blob: TempBlob) -> None: ...
    def forget_temp(self, blob: TempBlob) -> None: ...
    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]: ...


class FilesystemStore:
    def __init__(self, data_dir: Path, *, episodes_dir: Path | None = None) -> None:
        # episodes_dir: the operator tools may audit a tree that lives elsewhere (a restored copy).
        self.data_dir = data_dir
        self.episodes_dir = data_dir / "episodes" if episodes_dir is None else episodes_dir
        self.tmp_dir = data_dir / "tmp"

    def prepare(self) -> None:
        for directory in (self.episodes_dir, self.tmp_dir):
            make_dirs_durable(directory, self.data_dir)

    def final_path(self, host_id: str, episode_id: str) -> Path:
        return self.episodes_dir / host_id / f"{episode_id}{SUFFIX}"

    def exists(self, host_id: str, episode_id: str) -> bool:
        return self.final_path(host_id, episode_id).exists()

    def create_temp(self, host_id: str, episode_id: str, commit: str | None) -> TempBlob:
        directory = self.tmp_dir / host_id
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{episode_id}~{commit or '-'}~{secrets.token_hex(6)}.part"
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return TempBlob(host_id, episode_id, path, fd)

    def install(self, blob: TempBlob) -> bool:
        """fsync the data, link it under its final name; False if that name exists.

        Raises OSError from fsync: the caller must treat that as fatal.
        """
        os.fsync(blob.fd)
        failpoints.hit(failpoints.AFTER_FSYNC)
        os.close(blob.fd)
        blob.fd = -1
        final = self.final_path(blob.host_id, blob.episode_id)
        make_dirs_durable(final.parent, self.episodes_dir)
        try:
            os.link(blob.path, final)
        except FileExistsError:
            return False
        fsync_dir(final.parent)
        return True

    def discard(self, blob: TempBlob) -> None:
        """Remove an upload that will not be stored; never raises for a missing file."""
        if blob.fd >= 0:
            os.close(blob.fd)
            blob.fd = -1
        self.forget_temp(blob)

    def forget_temp(self, blob: TempBlob) -> None:
        """Drop the temp name once the final name is durable and indexed."""
        try:
            os.unlink(blob.path)
        except FileNotFoundError:
            pass

    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]:
        return file_digest(self.final_path(host_id, episode_id))

    def recover(self) -> list[Intent]:
        """At start, before serving: sort out what a crash left in tmp/.

        Temp files that were installed (same inode as the final file) are returned
        as intents (their row may be missing); every other temp file is removed.
        """
        intents: list[Intent] = []
        if not self.tmp_dir.is_dir():
            return intents
        removed = 0
        for host_dir in sorted(self.tmp_dir.iterdir()):
            if not host_dir.is_dir():
                host_dir.unlink(missing_ok=True)
                removed += 1
                continue
            for temp in sorted(host_dir.iterdir()):
                if not temp.is_file() or temp.is_symlink():
                    log.warning("leaving %s alone: not a temp file of ours", temp)
                    continue
                parsed = _parse_temp_name(temp.name)
                final = self.final_path(host_dir.name, parsed[0]) if parsed else None
                if parsed and final is not None and _same_file(temp, final):
                    intents.append(Intent(host_dir.name, parsed[0], parsed[1], temp))
                    continue
                temp.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d stale temp file(s) from %s", removed, self.tmp_dir)
        return intents

    def free_bytes(self) -> int:
        stat = os.statvfs(self.data_dir)
        return stat.f_bavail * stat.f_frsize

    def unready_reason(self, min_free_bytes: int) -> str | None:
        """Why an upload could not be stored now (None when it could): for /readyz."""
        for directory in (self.episodes_dir, self.tmp_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                return f"storage: {directory} is missing or not writable"
        try:
            free = self.free_bytes()
        except OSError as error:
            return f"storage: cannot stat {self.data_dir}: {error.strerror}"
        if free < min_free_bytes:
            return f"storage: {free} bytes free, below min_free_bytes ({min_free_bytes})"
        return None


def _parse_temp_name(name: str) -> tuple[str, str | None] | None:
    if not name.endswith(".part"):
        return None
    parts = name[: -len(".part")].split("~")
    if len(parts) != 3:
        return None
    episode_id, commit, _random = parts
    return episode_id, (None if commit == "-" else commit)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise


def file_digest(path: Path, on_block: Callable[[bytes], None] | None = None) -> tuple[str, int]:
    """sha256 and size of a file, read in blocks; on_block sees each block after hashing
    (progress, a second consumer); an exception it raises aborts the read."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as handle:
        while block := handle.read(READ_BLOCK):
            sha.update(block)
            size += len(block)
            if on_block is not None:
                on_block(block)
    return sha.hexdigest(), size
