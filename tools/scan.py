"""Walk episodes/<host>/<id>.tar.zst and read many files in parallel with bounded memory.

Only names the receiver could have written count as tarballs (valid host and episode ids,
regular files); anything else under the root is returned as a Stray with the reason.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from receiver.errors import InvalidId
from receiver.ids import check_id
from receiver.store import SUFFIX, FilesystemStore

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Tarball:
    host_id: str
    episode_id: str
    path: Path
    size: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.host_id, self.episode_id)


@dataclass(frozen=True)
class Stray:
    """An entry under the episodes root that is not a stored tarball."""

    path: Path
    reason: str


class Cancelled(Exception):
    """Raised inside a worker once the run is being stopped (Ctrl-C, a fatal error)."""


def _valid(kind: str, value: str) -> bool:
    try:
        check_id(kind, value)
    except InvalidId:
        return False
    return True


def scan_episodes(store: FilesystemStore, host: str | None) -> tuple[list[Tarball], list[Stray]]:
    """Every tarball under the store's episodes root (one host's with host), sorted by key."""
    root = store.episodes_dir
    tarballs: list[Tarball] = []
    strays: list[Stray] = []
    if host is not None:
        host_dirs = [root / host] if (root / host).is_dir() else []
    else:
        host_dirs = []
        for entry in _entries(root):
            if not entry.is_dir():
                strays.append(Stray(Path(entry.path), "not a host directory"))
            elif not _valid("host_id", entry.name):
                strays.append(Stray(Path(entry.path), "directory name is not a valid host id"))
            else:
                host_dirs.append(Path(entry.path))
    for host_dir in host_dirs:
        for entry in _entries(host_dir):
            path = Path(entry.path)
            episode_id = entry.name.removesuffix(SUFFIX)
            if not entry.name.endswith(SUFFIX):
                strays.append(Stray(path, f"name does not end in {SUFFIX}"))
            elif not _valid("episode_id", episode_id):
                strays.append(Stray(path, "name is not a valid episode id"))
            elif not entry.is_file():  # follows a symlink, as the receiver's exists() does
                strays.append(Stray(path, "not a regular file"))
            else:
                final = store.final_path(host_dir.name, episode_id)
                tarballs.append(Tarball(host_dir.name, episode_id, final, entry.stat().st_size))
    return tarballs, strays


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []


def bounded_map(
    work: Callable[[T], R], items: Iterable[T], workers: int, stop: threading.Event
) -> Iterator[tuple[T, R]]:
    """(item, work(item)) in completion order, with at most 2 * workers items in flight.

    If the consumer stops early or raises, stop is set (work should check it and raise
    Cancelled) and queued items are dropped, so the run ends after the files being read.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tools") as pool:
        pending: dict[Future[R], T] = {}
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    yield from _harvest(pending)
                pending[pool.submit(work, item)] = item
            while pending:
                yield from _harvest(pending)
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            raise


def _harvest(pending: dict[Future[R], T]) -> Iterator[tuple[T, R]]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        item = pending.pop(future)
        yield item, future.result()
