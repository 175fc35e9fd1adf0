"""Crash-safe file primitives: fsync a directory, write a file atomically.

A file written with atomic_write is either absent/old or complete under its
final name after a crash at any instant: temp file, fsync, rename, fsync dir.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path, stop_at: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed, up to stop_at."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != stop_at and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
