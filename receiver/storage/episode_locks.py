"""Per-episode mutual exclusion that holds across worker processes.

One lock file serves every episode: each (host, episode) maps to a byte offset
in it and is locked with a POSIX byte-range lock (released by the kernel if the
process dies). POSIX locks belong to the process, so a set of held keys keeps
two requests of one process apart. Acquisition never waits: a busy id is 423.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


def _offset(host_id: str, episode_id: str) -> int:
    digest = hashlib.sha256(f"{host_id}/{episode_id}".encode()).digest()
    return int.from_bytes(digest[:6], "big")  # 48 bits: collisions are negligible


class EpisodeLocks:
    def __init__(self, lock_path: Path) -> None:
        # The descriptor stays open for the life of the process: closing any descriptor
        # of this file would drop all of the process's byte-range locks on it.
        self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._held: set[tuple[str, str]] = set()

    def try_acquire(self, host_id: str, episode_id: str) -> bool:
        key = (host_id, episode_id)
        if key in self._held:
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(*key))
        except (BlockingIOError, PermissionError):
            return False
        self._held.add(key)
        return True

    def release(self, host_id: str, episode_id: str) -> None:
        key = (host_id, episode_id)
        if key in self._held:
            self._held.discard(key)
            if self._fd >= 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(*key))

    def close(self) -> None:
        """Drop every lock of this process (the kernel releases them with the descriptor)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
