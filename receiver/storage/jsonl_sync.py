"""Bring the view in line with index.jsonl: check it is about this file, then catch up or rebuild.

Called under the index's write lock. Rows reach the view only after the file holding them
is fsynced; a long catch-up logs its progress (rows/s, ETA) and is resumable, since every
chunk is committed with the position it reached.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import sqlite3
import time
from pathlib import Path

from receiver.storage.jsonl_file import batches, end_of_last_complete_line
from receiver.storage.jsonl_view import Position, ViewDatabase, is_corrupt

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 5.0
BIG_CATCH_UP = 64 << 20  # bytes: past this, relaxed durability and a bigger cache for the build
BIG_BATCHES = 8  # chunks (of CHUNK_BYTES) per transaction in a big build


def sync_view(db: ViewDatabase, index_path: Path, *, strict: bool) -> Position:
    """Make the view current with the file's complete lines; returns where it now stands."""
    with db.lock:
        try:
            return _sync(db, index_path, strict=strict)
        except sqlite3.Error as error:
            if not is_corrupt(error):
                raise
            log.warning("index view %s is damaged (%s); rebuilding it", db.path, error)
            db.close()
            db.remove_files()
            return _sync(db, index_path, strict=strict)


def _sync(db: ViewDatabase, index_path: Path, *, strict: bool) -> Position:
    conn = db.connection()
    try:
        fd = os.open(index_path, os.O_RDONLY)
    except FileNotFoundError:
        position = db.position()
        if position.offset or position.inode is not None:
            log.warning("index %s is gone; the view is emptied", index_path)
            _reset(db, conn)
        return db.position()
    try:
        stat = os.fstat(fd)
        position = db.position()
        reason = position.mismatch(fd, stat)
        if reason is not None:
            log.warning("index view %s: %s; rebuilding it from the index", db.path, reason)
            _reset(db, conn)
            position = db.position()
        end = end_of_last_complete_line(fd, stat.st_size)
        if end > position.offset:
            _catch_up(db, conn, fd, stat, position, end, strict=strict, path=index_path)
        return db.position()
    finally:
        os.close(fd)


def _reset(db: ViewDatabase, conn: sqlite3.Connection) -> None:
    with db.write() as conn:
        db.reset(conn)


def _catch_up(
    db: ViewDatabase,
    conn: sqlite3.Connection,
    fd: int,
    stat: os.stat_result,
    position: Position,
    end: int,
    *,
    strict: bool,
    path: Path,
) -> None:
    # Lines another writer appended may not be fsynced yet (it died before its fsync).
    os.fsync(fd)
    todo = end - position.offset
    big = todo > BIG_CATCH_UP
    if big:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-65536")
    progress = _Progress(position.offset, end, position.rows, big)
    # A big build commits every BIG_BATCHES chunks: each commit writes every page the chunk
    # touched to the log (one per host at least), so fewer commits write less. It stays
    # resumable: each commit holds the position its last chunk reached.
    per_commit = BIG_BATCHES if big else 1
    collecting = gc.isenabled() and big
    if collecting:
        gc.disable()  # the chunks' rows and tuples hold no cycles; scanning them is waste
    try:
        chunks = batches(fd, position.offset, end, position.lines, strict=strict, path=path)
        for first in chunks:
            # Each chunk is recorded as soon as it is decoded, while its rows are still in the
            # CPU's caches (a whole group decoded first had left them by its insert).
            with db.write() as conn:
                for batch in itertools.chain((first,), itertools.islice(chunks, per_commit - 1)):
                    added = db.apply(conn, batch, stat)
                    progress.step(batch.end, added)
    finally:
        if collecting:
            gc.enable()
        if big:
            conn.execute("PRAGMA synchronous=NORMAL")
            db.close()  # the build's page cache goes with its connection
    progress.done()


class _Progress:
    """Log lines for a catch-up: every PROGRESS_SECONDS while long, and one at the end."""

    def __init__(self, start: int, end: int, rows_before: int, big: bool) -> None:
        self.start, self.end, self.big = start, end, big
        self.rows_before = rows_before
        self.rows = 0
        self.began = self.last = time.monotonic()
        if big:
            log.info(
                "index view: reading %d bytes of index.jsonl from offset %d", end - start, start
            )

    def step(self, reached: int, added: int) -> None:
        self.rows += added
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        elapsed = now - self.began
        share = (reached - self.start) / max(1, self.end - self.start)
        eta = elapsed / share - elapsed if share else 0.0
        log.info(
            "index view: %d rows added, %.0f%% of the file, %.0f rows/s, ETA %.0f s",
            self.rows,
            share * 100,
            self.rows / elapsed,
            eta,
        )

    def done(self) -> None:
        elapsed = time.monotonic() - self.began
        level = logging.INFO if self.big or elapsed > 1 else logging.DEBUG
        log.log(
            level,
            "index view: current, %d rows (%d added in %.1f s, %.0f rows/s)",
            self.rows_before + self.rows,
            self.rows,
            elapsed,
            self.rows / elapsed if elapsed else 0.0,
        )
