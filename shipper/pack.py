"""Pack an episode directory into `<id>.tar.zst`: streaming, deterministic, crash-safe.

Members are written in sorted order with normalised metadata (uid/gid 0, no
owner names, modes 0644/0755, whole-second mtimes), relative paths only. The
sha256 of the compressed bytes is computed in the same pass; the output
appears under its final name only complete and fsynced (temp + rename).
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from episode_common.durable import fsync_dir
from episode_common.wire import TARBALL_SUFFIX
from shipper.direct_output import DirectOutput

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # Python < 3.14
    from backports import zstd  # type: ignore[no-redef, unused-ignore]

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


class PackError(Exception):
    """The episode cannot be packed as it is (an operator has to look)."""


class PackAborted(Exception):
    """Packing stopped because the daemon is shutting down."""


@dataclass(frozen=True)
class Packed:
    path: Path
    sha256: str
    size_bytes: int
    # name -> (size, mtime_ns) of each file and symlink packed (directories only).
    manifest: dict[str, tuple[int, int]] | None = field(default=None, compare=False)


def zstd_workers(configured: int) -> int:
    """zstd's nb_workers for the `zstd_threads` key: 0 means one worker per core.

    (zstd's own 0 means "no workers, compress in the calling thread".)
    """
    return configured or os.cpu_count() or 1


class _Sink:
    """Compress in the caller's thread; hash and write in a writer thread, in order.

    The writer overlaps the disk with compression: a write that blocks on the
    device no longer stalls the zstd workers. The queue is short, so memory
    stays bounded (a few zstd output chunks and one output buffer).
    """

    def __init__(self, out: BinaryIO, level: int, threads: int, *, direct: bool = True) -> None:
        self.out = DirectOutput(out.fileno(), direct=direct)
        self.digest = hashlib.sha256()
        self.size = 0
        self.compressor = zstd.ZstdCompressor(
            options={
                zstd.CompressionParameter.compression_level: level,
                zstd.CompressionParameter.nb_workers: threads,
                zstd.CompressionParameter.checksum_flag: 1,
            }
        )
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.writer = threading.Thread(target=self._drain, name="pack-writer", daemon=True)
        self.writer.start()

    def _drain(self) -> None:
        try:
            while (data := self.chunks.get()) is not None:
                self.digest.update(data)
                self.out.write(data)
                self.size += len(data)
                del data  # not held while waiting for the next one
            self.out.close()
        except BaseException as error:
            self.error = error
            self.out.abandon()
            while self.chunks.get() is not None:
                pass  # keep taking, so that the producer never blocks on a full queue

    def _emit(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if data:
            self.chunks.put(data)

    def write(self, data: bytes | memoryview) -> None:
        self._emit(self.compressor.compress(data))

    def finish(self) -> None:
        """Flush the compressor and wait until every byte is written."""
        self._emit(self.compressor.flush())
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.writer.is_alive():
            self.chunks.put(None)
            self.writer.join()


def _members(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(archive name, path, lstat) depth-first, each directory's entries sorted by name."""
    stack: list[tuple[str, Path]] = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda entry: os.fsencode(entry.name))
        subdirs: list[tuple[str, Path]] = []
        for entry in entries:
            name = f"{prefix}{entry.name}"
            path = Path(entry.path)
            info = entry.stat(follow_symlinks=False)
            yield name, path, info
            if stat.S_ISDIR(info.st_mode):
                subdirs.append((f"{name}/", path))
        # Visit subdirectories after this directory's own entries, in order.
        stack.extend(reversed(subdirs))


def _tarinfo(name: str, path: Path, info: os.stat_result, root: Path) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.mtime = int(info.st_mtime)
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    executable = info.st_mode & 0o111
    if stat.S_ISDIR(info.st_mode):
        member.type, member.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(info.st_mode):
        member.type, member.size = tarfile.REGTYPE, info.st_size
        member.mode = 0o755 if executable else 0o644
    elif stat.S_ISLNK(info.st_mode):
        target = os.readlink(path)
        resolved = (path.parent / target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(root.resolve()):
            raise PackError(f"{name}: symlink points outside the episode ({target})")
        member.type, member.linkname, member.mode = tarfile.SYMTYPE, target, 0o777
    else:
        raise PackError(f"{name}: not a regular file, directory or symlink")
    return member


def _copy(sink: _Sink, path: Path, size: int, stop: threading.Event | None) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    remaining = size
    with open(path, "rb") as source:
        while remaining:
            if stop is not None and stop.is_set():
                raise PackAborted
            count = source.readinto(view[: min(CHUNK, remaining)])
            if not count:
                raise PackError(f"{path.name}: shrank while being packed")
            sink.write(view[:count])
            remaining -= count
        if source.read(1):
            raise PackError(f"{path.name}: grew while being packed")
    if size % BLOCK:
        sink.write(bytes(BLOCK - size % BLOCK))


def pack_directory(
    source: Path,
    dest_dir: Path,
    episode_id: str,
    *,
    level: int = 3,
    threads: int = 0,
    stop: threading.Event | None = None,
    direct: bool = True,
) -> Packed:
    """Write `<dest_dir>/<episode_id>.tar.zst` from the directory `source`.

    threads is the `zstd_threads` setting: 0 means one zstd worker per core.
    direct=False keeps the output in the page cache (O_DIRECT is otherwise used
    where the file system allows it; see shipper.direct_output).
    """
    final = dest_dir / f"{episode_id}{TARBALL_SUFFIX}"
    tmp = dest_dir / f".{episode_id}.{secrets.token_hex(6)}.tmp"
    root = source.resolve()
    with open(tmp, "xb", buffering=0) as out:
        sink = _Sink(out, level, zstd_workers(threads), direct=direct)
        try:
            written = 0
            manifest: dict[str, tuple[int, int]] = {}
            for name, path, info in _members(root):
                member = _tarinfo(name, path, info, root)
                if not stat.S_ISDIR(info.st_mode):
                    manifest[name] = (info.st_size, info.st_mtime_ns)
                header = member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                sink.write(header)
                written += len(header)
                if member.type == tarfile.REGTYPE:
                    _copy(sink, path, member.size, stop)
                    written += -(-member.size // BLOCK) * BLOCK
            # End of archive: two zero blocks, padded to a whole record as tar(1) does.
            trailer = 2 * BLOCK
            trailer += -(written + trailer) % RECORD
            sink.write(bytes(trailer))
            sink.finish()
            os.fsync(out.fileno())
        except BaseException:
            sink.close()
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, final)
    fsync_dir(dest_dir)
    return Packed(final, sink.digest.hexdigest(), sink.size, manifest)


def hash_file(path: Path, stop: threading.Event | None = None) -> Packed:
    """sha256 and size of an already-packed tarball, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as source:
        while count := source.readinto(buffer):
            if stop is not None and stop.is_set():
                raise PackAborted
            digest.update(view[:count])
            size += count
    return Packed(path, digest.hexdigest(), size)


def remove_temporaries(dest_dir: Path) -> int:
    """Delete leftovers of packing runs that a crash interrupted; returns how many."""
    removed = 0
    for leftover in dest_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
