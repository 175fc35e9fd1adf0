"""A blob store's listing kept on disk for one operator run, so memory stays flat in the blobs.

verify and backfill need the listing twice: whole, to know what is there (missing rows,
totals for progress), then blob by blob, to read each one. A store of millions of blobs
does not fit in memory as Python objects, so the streamed listing goes into a private
temporary SQLite file (SQLite places it and deletes it on close, never in the data_dir).
Strays are kept in memory: they are problems to report, few by nature.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator

from receiver.storage import BlobStore, StoredBlob, Stray

_SCHEMA = """
CREATE TABLE listed (
    host_id TEXT NOT NULL, episode_id TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (host_id, episode_id)) WITHOUT ROWID
"""
_CHUNK = 10_000  # rows per executemany and per fetch: bounded, and few round trips


class ListedBlobs:
    """`with ListedBlobs.of(store, host) as listed`: count, bytes, strays, `key in listed`,
    and the blobs again in key order (optionally only those a predicate keeps)."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self.listed = 0  # every blob the store listed
        self.count = 0  # the blobs recorded (those keep kept), and their bytes
        self.bytes = 0
        self.strays: list[Stray] = []
        self._conn = sqlite3.connect("", isolation_level=None)  # private, deleted on close
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16384"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.execute(_SCHEMA)

    @classmethod
    def of(
        cls,
        blobs: BlobStore,
        host_id: str | None = None,
        keep: Callable[[StoredBlob], bool] | None = None,
    ) -> ListedBlobs:
        """The store's listing (one host's with host_id); with keep, only the blobs it keeps
        are recorded (count and bytes are of those)."""
        listed = cls(blobs)
        try:
            listed.add(blobs.scan_blobs(host_id), keep)
        except BaseException:
            listed.close()
            raise
        return listed

    def add(
        self, found: Iterable[StoredBlob | Stray], keep: Callable[[StoredBlob], bool] | None
    ) -> None:
        pending: list[tuple[str, str, int]] = []
        self._conn.execute("BEGIN")
        for item in found:
            if isinstance(item, Stray):
                self.strays.append(item)
                continue
            self.listed += 1
            if keep is None or keep(item):
                self.count += 1
                self.bytes += item.size_bytes
                pending.append((item.host_id, item.episode_id, item.size_bytes))
                if len(pending) >= _CHUNK:
                    self._insert(pending)
                    pending = []
        self._insert(pending)
        self._conn.execute("COMMIT")

    def _insert(self, values: list[tuple[str, str, int]]) -> None:
        # A store lists each name once; OR IGNORE keeps a second listing of one harmless.
        self._conn.executemany("INSERT OR IGNORE INTO listed VALUES (?, ?, ?)", values)

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        found = self._conn.execute(
            "SELECT 1 FROM listed WHERE host_id = ? AND episode_id = ?", (key[0], key[1])
        ).fetchone()
        return found is not None

    def __iter__(self) -> Iterator[StoredBlob]:
        """The recorded blobs in key order, read back a chunk at a time."""
        cursor = self._conn.execute("SELECT host_id, episode_id, size FROM listed ORDER BY 1, 2")
        while chunk := cursor.fetchmany(_CHUNK):
            for host_id, episode_id, size in chunk:
                yield StoredBlob(host_id, episode_id, size, self._blobs.where(host_id, episode_id))

    def __enter__(self) -> ListedBlobs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()
