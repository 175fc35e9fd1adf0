"""The bench's inputs, made fast: episode tarballs, episode directories, stores, index files.

Bytes come from a 16 MiB random pool read at shifting offsets: as incompressible to zstd
as fresh random data (the pool is far larger than zstd's window) but made at memory speed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from receiver.storage import DataDirLayout
from receiver.storage.rows import encode_row, new_row

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

MiB = 1024 * 1024
POOL_BYTES = 16 * MiB
# Episode-like members: a few MiB each.
MEMBER_BYTES = 4 * MiB
# 16 of 256 byte values: about half the entropy of random bytes, so zstd -3 roughly halves it.
_LOW_ENTROPY = bytes(0x30 + (b & 0x0F) for b in range(256))


class Pool:
    """Incompressible bytes on demand, from one random pool."""

    def __init__(self) -> None:
        self._pool = os.urandom(POOL_BYTES)
        self._low = self._pool.translate(_LOW_ENTROPY)
        self._offset = 0

    def take(self, size: int, *, compressible: bool = False) -> bytes:
        source = self._low if compressible else self._pool
        parts: list[bytes] = []
        while size > 0:
            start = self._offset % (POOL_BYTES - 4096)
            step = min(size, POOL_BYTES - start)
            parts.append(source[start : start + step])
            size -= step
            self._offset += 4099 + step  # never repeat a previous alignment exactly
        return b"".join(parts)


class _PoolReader:
    def __init__(self, pool: Pool, size: int) -> None:
        self._pool = pool
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._pool.take(n)


def meta_json(commit: str) -> bytes:
    return json.dumps({"code_version": {"commit": commit}}).encode()


def write_episode_tarball(pool: Pool, path: Path, commit: str, size: int) -> int:
    """A valid .tar.zst of about `size` bytes: meta.json and incompressible members."""
    options = {
        zstd.CompressionParameter.compression_level: 1,
        zstd.CompressionParameter.checksum_flag: 1,
    }
    with zstd.ZstdFile(path, "w", options=options) as out:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            meta = meta_json(commit)
            info = tarfile.TarInfo("meta.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
            # Headers and framing add ~1 KiB plus ~0.6 KiB per member (tar's zero padding
            # compresses away): stay just under `size`.
            left = max(1, size - 2048 - (size // MEMBER_BYTES + 1) * 700)
            number = 0
            while left > 0:
                info = tarfile.TarInfo(f"data/{number:05d}.bin")
                info.size = min(MEMBER_BYTES, left)
                tar.addfile(info, _PoolReader(pool, info.size))
                left -= info.size
                number += 1
    return path.stat().st_size


def write_raw(pool: Pool, path: Path, size: int) -> str:
    """`size` incompressible bytes; returns their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left > 0:
            block = pool.take(min(4 * MiB, left))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def write_episode_dir(pool: Pool, root: Path, commit: str, size: int) -> int:
    """An episode directory of `size` bytes: meta.json and files half random, half low-entropy."""
    root.mkdir(parents=True)
    (root / "meta.json").write_bytes(meta_json(commit))
    total = 0
    number = 0
    while total < size:
        directory = root / ("camera" if number % 2 else "joints")
        directory.mkdir(exist_ok=True)
        length = min(16 * MiB, size - total)
        with (directory / f"{number:04d}.bin").open("wb") as out:
            for start in range(0, length, MiB):
                out.write(pool.take(min(MiB, length - start), compressible=start % (2 * MiB) > 0))
        total += length
        number += 1
    return total


def write_store(pool: Pool, data_dir: Path, total: int, file_bytes: int) -> list[Path]:
    """A receiver data_dir holding `total` bytes of tarballs, each with its index row."""
    host_dir = data_dir / "episodes" / "bench"
    host_dir.mkdir(parents=True)
    paths: list[Path] = []
    with DataDirLayout(data_dir).index_path.open("wb") as index:
        for number in range(max(1, -(-total // file_bytes))):
            size = min(file_bytes, total - number * file_bytes) or file_bytes
            path = host_dir / f"ep-{number:05d}.tar.zst"
            sha256 = write_raw(pool, path, size)
            index.write(encode_row(new_row("bench", path.name[:-8], sha256, size, None)))
            paths.append(path)
    return paths


def write_index(path: Path, rows: int, commit: str) -> int:
    """An index.jsonl of `rows` rows over 100 hosts (no tarballs behind them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sha256 = hashlib.sha256(b"bench").hexdigest()
    with path.open("wb") as out:
        batch: list[bytes] = []
        for number in range(rows):
            row = new_row(f"host-{number % 100:02d}", f"ep-{number:08d}", sha256, 4096, commit)
            batch.append(encode_row(row))
            if len(batch) == 10_000:
                out.write(b"".join(batch))
                batch.clear()
        out.write(b"".join(batch))
    return path.stat().st_size
