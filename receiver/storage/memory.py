"""In-memory blob store and catalogue: test doubles that keep every interface promise.

Nothing is written anywhere; a process's doubles are shared only by the objects given them.
The ingest rules run against these in unit tests, without a disk.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from typing import BinaryIO

from receiver.storage.base import CatalogueState, StoredBlob, Stray
from receiver.storage.marks import CommitSummary, MemoryMarks
from receiver.storage.rows import HostSummary, IndexRow, summarise_hosts


class MemoryWriter:
    def __init__(self, store: MemoryBlobStore, host_id: str, episode_id: str) -> None:
        self._store = store
        self._key = (host_id, episode_id)
        self._parts: list[bytes] = []
        self.aborted = False

    @property
    def where(self) -> str:
        return f"memory:{self._key[0]}/{self._key[1]}"

    def write(self, chunks: list[bytes]) -> None:
        self._parts.extend(chunks)

    def commit(self) -> bool:
        with self._store.lock:
            if self._key in self._store.blobs:
                return False
            self._store.blobs[self._key] = b"".join(self._parts)
            return True

    def close(self) -> None:
        self._parts = []

    def abort(self) -> None:
        self._parts = []
        self.aborted = True


class MemoryBlobStore:
    def __init__(self, free_bytes: int | None = None) -> None:
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()
        self._free_bytes = free_bytes

    def prepare(self) -> None:
        pass

    def open_writer(
        self, host_id: str, episode_id: str, commit: str | None, sha256: str | None = None
    ) -> MemoryWriter:
        return MemoryWriter(self, host_id, episode_id)

    def exists(self, host_id: str, episode_id: str) -> bool:
        return (host_id, episode_id) in self.blobs

    def where(self, host_id: str, episode_id: str) -> str:
        return f"memory:{host_id}/{episode_id}"

    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]:
        data = self.blobs[(host_id, episode_id)]
        return hashlib.sha256(data).hexdigest(), len(data)

    def open_read(self, host_id: str, episode_id: str) -> BinaryIO:
        return io.BytesIO(self.blobs[(host_id, episode_id)])

    def scan_blobs(self, host_id: str | None = None) -> Iterator[StoredBlob | Stray]:
        for (host, episode), data in sorted(self.blobs.items()):
            if host_id is None or host == host_id:
                yield StoredBlob(host, episode, len(data), self.where(host, episode))

    def recover(self) -> list[StoredBlob]:
        return []

    def forget_note(self, blob: StoredBlob) -> None:
        pass

    def free_bytes(self) -> int | None:
        return self._free_bytes

    def unready_reason(self, min_free_bytes: int) -> str | None:
        if self._free_bytes is not None and self._free_bytes < min_free_bytes:
            return f"storage: {self._free_bytes} bytes free, below min_free_bytes"
        return None


class MemoryCatalogue(MemoryMarks):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], IndexRow] = {}
        self.claims: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def recover(self, *, repair: bool = True) -> CatalogueState:
        return CatalogueState(rows=len(self.rows))

    def open(self) -> None:
        pass

    def close(self) -> None:
        self.claims.clear()

    def lookup(self, host_id: str, episode_id: str) -> IndexRow | None:
        return self.rows.get((host_id, episode_id))

    def append_if_absent(self, row: IndexRow) -> tuple[IndexRow, bool]:
        with self._lock:
            existing = self.rows.setdefault(row.key, row)
        return existing, existing is row

    def claim(self, host_id: str, episode_id: str) -> bool:
        with self._lock:
            if (host_id, episode_id) in self.claims:
                return False
            self.claims.add((host_id, episode_id))
            return True

    def release(self, host_id: str, episode_id: str) -> None:
        with self._lock:
            self.claims.discard((host_id, episode_id))

    def count(self) -> int:
        return len(self.rows)

    def iter_rows(self) -> Iterator[IndexRow]:
        return iter(list(self.rows.values()))

    def host_summaries(self) -> dict[str, HostSummary]:
        return summarise_hosts(list(self.rows.values()))

    def unready_reason(self) -> str | None:
        return None

    def rows_after(self, key: tuple[str, str] | None) -> Iterator[IndexRow]:
        keys = list(self.rows)  # a dict keeps insertion order: commit order here
        if key is not None and key not in self.rows:
            raise KeyError(key)
        start = 0 if key is None else keys.index(key) + 1
        return iter([self.rows[k] for k in keys[start:]])

    def commit_summaries(self) -> dict[str | None, CommitSummary]:
        totals: dict[str | None, CommitSummary] = {}
        for row in list(self.rows.values()):
            seen = totals.get(row.commit, CommitSummary(0, 0))
            totals[row.commit] = CommitSummary(seen.episodes + 1, seen.bytes + row.size_bytes)
        return totals
