"""Blobs on a local file system: written to a temp file, installed by link(), never overwritten.

Layout: <data_dir>/episodes/<host>/<id>.tar.zst (final) and
<data_dir>/tmp/<host>/<id>~<commit>~<random>.part (in progress). link(temp, final) fails
rather than replace an existing file. The temp name stays until the catalogue row is
written, so after a crash it tells recovery which installed file may still lack its row.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from episode_common.durable import fsync_dir, make_dirs_durable, start_writeback
from episode_common.wire import TARBALL_SUFFIX, is_valid_id
from receiver import failpoints
from receiver.storage.base import DurabilityError, StoredBlob, Stray
from receiver.storage.hashing import digest_stream
from receiver.storage.layout import DataDirLayout

log = logging.getLogger(__name__)

# Start writeback of what was written every so often, so the final fsync has little left.
WRITEBACK_BYTES = 16 * 1024 * 1024
_IOV_MAX = 1024


class FilesystemWriter:
    """One upload's temp file; see BlobWriter."""

    def __init__(self, store: FilesystemStore, host_id: str, episode_id: str, path: Path) -> None:
        self._store = store
        self.host_id = host_id
        self.episode_id = episode_id
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._written = 0
        self._synced_upto = 0

    @property
    def where(self) -> str:
        return str(self.path)

    def write(self, chunks: list[bytes]) -> None:
        for start in range(0, len(chunks), _IOV_MAX):
            write_all(self._fd, chunks[start : start + _IOV_MAX])
        self._written += sum(len(chunk) for chunk in chunks)
        if self._written - self._synced_upto >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._synced_upto, 0)
            self._synced_upto = self._written

    def commit(self) -> bool:
        final = self._store.final_path(self.host_id, self.episode_id)
        try:
            os.fsync(self._fd)
            failpoints.hit(failpoints.AFTER_FSYNC)
            self._close_fd()
            make_dirs_durable(final.parent, self._store.layout.episodes_dir)
            try:
                os.link(self.path, final)
            except FileExistsError:
                self.abort()
                return False
            fsync_dir(final.parent)
        except OSError as error:
            raise DurabilityError(f"fsync/link of {self.path} failed: {error}") from error
        return True

    def close(self) -> None:
        _unlink(self.path)

    def abort(self) -> None:
        self._close_fd()
        _unlink(self.path)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FilesystemStore:
    """Tarballs under <data_dir>/episodes (or another tree the operator tools audit)."""

    def __init__(self, data_dir: Path, *, episodes_dir: Path | None = None) -> None:
        self.layout = DataDirLayout(data_dir)
        self.episodes_dir = self.layout.episodes_dir if episodes_dir is None else episodes_dir

    def prepare(self) -> None:
        for directory in (self.episodes_dir, self.layout.tmp_dir):
            make_dirs_durable(directory, self.layout.data_dir)

    def final_path(self, host_id: str, episode_id: str) -> Path:
        return self.episodes_dir / host_id / f"{episode_id}{TARBALL_SUFFIX}"

    def open_writer(
        self, host_id: str, episode_id: str, commit: str | None, sha256: str | None = None
    ) -> FilesystemWriter:
        directory = self.layout.tmp_dir / host_id
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{episode_id}~{commit or '-'}~{secrets.token_hex(6)}.part"
        return FilesystemWriter(self, host_id, episode_id, directory / name)

    def exists(self, host_id: str, episode_id: str) -> bool:
        return self.final_path(host_id, episode_id).exists()

    def where(self, host_id: str, episode_id: str) -> str:
        return str(self.final_path(host_id, episode_id))

    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]:
        with self.open_read(host_id, episode_id) as handle:
            return digest_stream(handle)

    def open_read(self, host_id: str, episode_id: str) -> BinaryIO:
        return self.final_path(host_id, episode_id).open("rb", buffering=0)

    def scan_blobs(self, host_id: str | None = None) -> Iterator[StoredBlob | Stray]:
        for host_dir in self._host_dirs(host_id):
            if isinstance(host_dir, Stray):
                yield host_dir
                continue
            with _scan(host_dir) as entries:  # streamed: a host may have millions
                for entry in entries:
                    yield self._classify(host_dir.name, entry)

    def _host_dirs(self, host_id: str | None) -> list[Path | Stray]:
        if host_id is not None:
            only = self.episodes_dir / host_id
            return [only] if only.is_dir() else []
        host_dirs: list[Path | Stray] = []
        for entry in _entries(self.episodes_dir):
            if not entry.is_dir():
                host_dirs.append(Stray(entry.path, "not a host directory"))
            elif not is_valid_id(entry.name):
                host_dirs.append(Stray(entry.path, "directory name is not a valid host id"))
            else:
                host_dirs.append(Path(entry.path))
        return host_dirs

    def _classify(self, host_id: str, entry: os.DirEntry[str]) -> StoredBlob | Stray:
        episode_id = entry.name.removesuffix(TARBALL_SUFFIX)
        if not entry.name.endswith(TARBALL_SUFFIX):
            return Stray(entry.path, f"name does not end in {TARBALL_SUFFIX}")
        if not is_valid_id(episode_id):
            return Stray(entry.path, "name is not a valid episode id")
        if not entry.is_file():  # follows a symlink, as exists() does
            return Stray(entry.path, "not a regular file")
        where = self.where(host_id, episode_id)
        return StoredBlob(host_id, episode_id, entry.stat().st_size, where)

    def recover(self) -> list[StoredBlob]:
        """Temp files that were installed (same inode as the final file) are returned (their
        row may be missing); every other temp file is removed."""
        tmp_dir = self.layout.tmp_dir
        if not tmp_dir.is_dir():
            return []
        found: list[StoredBlob] = []
        removed = 0
        for host_dir in sorted(tmp_dir.iterdir()):
            if not host_dir.is_dir():
                host_dir.unlink(missing_ok=True)
                removed += 1
                continue
            for temp in sorted(host_dir.iterdir()):
                if not temp.is_file() or temp.is_symlink():
                    log.warning("leaving %s alone: not a temp file of ours", temp)
                    continue
                installed = self._installed(host_dir.name, temp)
                if installed is not None:
                    found.append(installed)
                    continue
                temp.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d stale temp file(s) from %s", removed, tmp_dir)
        return found

    def _installed(self, host_id: str, temp: Path) -> StoredBlob | None:
        parsed = _parse_temp_name(temp.name)
        if parsed is None:
            return None
        episode_id, commit = parsed
        final = self.final_path(host_id, episode_id)
        if not _same_file(temp, final):
            return None
        size = final.stat().st_size
        return StoredBlob(host_id, episode_id, size, str(final), commit, note=str(temp))

    def forget_note(self, blob: StoredBlob) -> None:
        if blob.note is not None:
            _unlink(Path(blob.note))

    def free_bytes(self) -> int:
        stat = os.statvfs(self.layout.data_dir)
        return stat.f_bavail * stat.f_frsize

    def unready_reason(self, min_free_bytes: int) -> str | None:
        for directory in (self.episodes_dir, self.layout.tmp_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                return f"storage: {directory} is missing or not writable"
        try:
            free = self.free_bytes()
        except OSError as error:
            return f"storage: cannot stat {self.layout.data_dir}: {error.strerror}"
        if free < min_free_bytes:
            return f"storage: {free} bytes free, below min_free_bytes ({min_free_bytes})"
        return None


def write_all(fd: int, buffers: list[bytes]) -> None:
    """Write every byte of buffers, in order (writev, then by hand after a short write)."""
    total = sum(len(b) for b in buffers)
    written = os.writev(fd, buffers)
    if written == total:
        return
    # Short write (rare): finish byte by byte from where writev stopped.
    remaining = memoryview(b"".join(buffers))[written:]
    while remaining:
        remaining = remaining[os.write(fd, remaining) :]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _scan(directory: Path) -> Iterator[Iterator[os.DirEntry[str]]]:
    """os.scandir of a directory that may be gone (removed meanwhile): then nothing."""
    try:
        iterator = os.scandir(directory)
    except FileNotFoundError:
        yield iter(())
        return
    with iterator:
        yield iterator


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []


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
