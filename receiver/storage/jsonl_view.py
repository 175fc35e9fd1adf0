"""index.jsonl's derived view: a SQLite file beside it (<stem>.view.sqlite3), shared by workers.

It holds where each (host, episode) row is in the file, per-host and per-commit totals, and
the position up to which it is current, with checks that tell whether it is about this file.
Only the holder of the index's write lock changes it; anything in doubt is rebuilt from the
file, never trusted over it. Durability is relaxed (WAL, synchronous=NORMAL) for that reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from receiver.storage.rows import HostSummary, IndexRow

log = logging.getLogger(__name__)
_HOST_ID = attrgetter("host_id")
_EPISODE_ID = attrgetter("episode_id")

# 2: rows are keyed by (host number, episode_id) instead of (host_id, episode_id).
SCHEMA_VERSION = 2
HEAD_BYTES = 4096  # the file's first bytes are hashed: a replaced or rewritten file differs here

# rows is keyed by a small host number (host_keys) and the episode id: a B-tree insert compares
# an integer before any text, which is most of a build's cost, and the key keeps the rows of
# one host together, so a chunk of rows dirties the few pages at each host's end (a hash of
# the whole key would scatter every chunk over all pages).
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS position (
    id INTEGER PRIMARY KEY CHECK (id = 1), dev INTEGER, inode INTEGER,
    offset INTEGER NOT NULL, lines INTEGER NOT NULL, rows INTEGER NOT NULL,
    head_len INTEGER NOT NULL, head_hash BLOB, last_start INTEGER NOT NULL, last_hash BLOB)""",
    """CREATE TABLE IF NOT EXISTS host_keys (
    number INTEGER PRIMARY KEY, host_id TEXT NOT NULL UNIQUE)""",
    """CREATE TABLE IF NOT EXISTS rows (
    host INTEGER NOT NULL, episode_id TEXT NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, PRIMARY KEY (host, episode_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY, episodes INTEGER NOT NULL, bytes INTEGER NOT NULL,
    last_seen TEXT NOT NULL, last_commit TEXT) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS commits (
    commit_id TEXT PRIMARY KEY, episodes INTEGER NOT NULL, bytes INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, method TEXT, host TEXT, episode TEXT,
    outcome TEXT, status INTEGER, commit_id TEXT, behind_by INTEGER)""",
    """CREATE TABLE IF NOT EXISTS stale (
    host TEXT PRIMARY KEY, at REAL NOT NULL, commit_id TEXT, reason TEXT, behind_by INTEGER,
    episode TEXT, refusals INTEGER NOT NULL, accepted_since REAL) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO position VALUES (1, NULL, NULL, 0, 0, 0, 0, NULL, 0, NULL)",
)
# The tables a rebuild starts afresh; rejections and stale marks survive it.
DERIVED_TABLES = ("rows", "host_keys", "hosts", "commits")
_OFFSET_OF = "SELECT offset FROM rows WHERE host = ? AND episode_id = ?"
_LOCATE = """
SELECT offset, length FROM rows
WHERE host = (SELECT number FROM host_keys WHERE host_id = ?) AND episode_id = ?
"""

_HOST_UPSERT = """
INSERT INTO hosts VALUES (?, ?, ?, ?, ?) ON CONFLICT (host_id) DO UPDATE SET
    episodes = episodes + excluded.episodes, bytes = bytes + excluded.bytes,
    last_commit = CASE WHEN excluded.last_seen >= last_seen THEN excluded.last_commit
                       ELSE last_commit END,
    last_seen = max(last_seen, excluded.last_seen)
"""
_COMMIT_UPSERT = """
INSERT INTO commits VALUES (?, ?, ?) ON CONFLICT (commit_id) DO UPDATE SET
    episodes = episodes + excluded.episodes, bytes = bytes + excluded.bytes
"""


def is_corrupt(error: sqlite3.Error) -> bool:
    """The view file is damaged (not a database, malformed), as opposed to busy or full."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(
        error, sqlite3.OperationalError
    )


def view_path_for(index_path: Path) -> Path:
    return index_path.with_name(index_path.stem + ".view.sqlite3")


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class Position:
    """How far the view is current, and what the file looked like there."""

    dev: int | None
    inode: int | None
    offset: int
    lines: int  # lines of the file before offset, rows and skipped ones
    rows: int  # rows in the view (first row of each key)
    head_len: int
    head_hash: bytes | None
    last_start: int  # where the line ending at offset starts
    last_hash: bytes | None

    def mismatch(self, fd: int, stat: os.stat_result) -> str | None:
        """Why this view is not about the file open at fd (None: it is, up to offset)."""
        if self.inode is None:
            return None if self.offset == 0 else "the view names no file"
        if (stat.st_dev, stat.st_ino) != (self.dev, self.inode):
            return "index.jsonl was replaced (another inode)"
        if stat.st_size < self.offset:
            return f"index.jsonl is shorter ({stat.st_size} bytes) than the view's position"
        if digest(os.pread(fd, self.head_len, 0)) != self.head_hash:
            return "index.jsonl's first bytes changed"
        last = os.pread(fd, self.offset - self.last_start, self.last_start)
        if self.offset and (digest(last) != self.last_hash or not last.endswith(b"\n")):
            return "index.jsonl's row before the view's position changed"
        return None


@dataclass
class Batch:
    """Complete lines read from the file after the view's position, decoded."""

    start: int
    end: int
    rows: list[IndexRow]
    offsets: list[int]
    lengths: list[int]
    lines: int  # including lines that are not rows (skipped)
    head: bytes  # the file's first HEAD_BYTES as far as end
    last_start: int
    last_line: bytes


class ViewDatabase:
    """One process's connection to the view; every use is serialised by one lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None
        # host_id -> host_keys.number, valid within one write transaction only: numbers given
        # out by a transaction that rolls back would otherwise outlive it.
        self._numbers: dict[str, int] = {}

    def connection(self) -> sqlite3.Connection:
        """Connected to the view file now at path (reconnects if it was replaced or removed)."""
        try:
            inode: int | None = self.path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if self._conn is not None and inode == self._inode:
            return self._conn
        self.close()
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as error:
            if not is_corrupt(error):
                raise
            # Not a database (garbage, truncated mid-page): it is only derived, start over.
            log.warning("index view %s is unreadable (%s); rebuilding it", self.path, error)
            self.remove_files()
            self._conn = self._open()
        self._inode = self.path.stat().st_ino
        return self._conn

    def _open(self) -> sqlite3.Connection:
        _refuse_truncated(self.path)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a lost tail is caught up from the file
            conn.execute("PRAGMA journal_size_limit=4194304")  # the log's disk space stays small
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # new (a view in use is only read here: a full disk can open it)
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION:
                _upgrade(conn, version, self.path)
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"view schema {version}, expected {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back if anything in it fails."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        self._numbers = {}  # another process may have numbered hosts since
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                conn.execute("ROLLBACK")
            raise

    def remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def position(self) -> Position:
        row = self.connection().execute("SELECT * FROM position").fetchone()
        return Position(*row[1:])

    def reset(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: forget every row (rejections and marks stay)."""
        for table in DERIVED_TABLES:
            conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        self._numbers = {}
        conn.execute(
            "UPDATE position SET dev=NULL, inode=NULL, offset=0, lines=0, rows=0, head_len=0,"
            " head_hash=NULL, last_start=0, last_hash=NULL"
        )

    def apply(self, conn: sqlite3.Connection, batch: Batch, stat: os.stat_result) -> int:
        """Inside a write transaction: add a batch's rows (the first of a key wins); rows added."""
        hosts = list(map(_HOST_ID, batch.rows))
        numbers = self._host_numbers(conn, hosts)
        keyed = list(
            zip(
                map(numbers.__getitem__, hosts),
                map(_EPISODE_ID, batch.rows),
                batch.offsets,
                batch.lengths,
                strict=True,
            )
        )
        before = conn.total_changes
        # No savepoint around it: inside one, SQLite copies every page it changes to a
        # statement journal first (a third of a build's time at 10M rows).
        conn.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)", keyed)
        added = batch.rows
        if conn.total_changes - before != len(keyed):
            # Some key was there already (a duplicate row): a row was added if its key's
            # entry is now its own line (the first line of a key in the batch wins).
            added = [
                row
                for row, (host, episode, offset, _) in zip(batch.rows, keyed, strict=True)
                if conn.execute(_OFFSET_OF, (host, episode)).fetchone()[0] == offset
            ]
        _add_totals(conn, added)
        conn.execute(
            "UPDATE position SET dev=?, inode=?, offset=?, lines=lines+?, rows=rows+?,"
            " head_len=?, head_hash=?, last_start=?, last_hash=?",
            (
                stat.st_dev,
                stat.st_ino,
                batch.end,
                batch.lines,
                len(added),
                len(batch.head),
                digest(batch.head),
                batch.last_start,
                digest(batch.last_line),
            ),
        )
        return len(added)

    def _host_numbers(self, conn: sqlite3.Connection, hosts: list[str]) -> dict[str, int]:
        """Inside a write transaction: every host's number, new hosts numbered now."""
        numbers = self._numbers
        for host in set(hosts).difference(numbers):
            found = conn.execute("SELECT number FROM host_keys WHERE host_id=?", (host,))
            row = (
                found.fetchone()
                or conn.execute(
                    "INSERT INTO host_keys (host_id) VALUES (?) RETURNING number", (host,)
                ).fetchone()
            )
            numbers[host] = row[0]
        return numbers

    def locate(self, host_id: str, episode_id: str) -> tuple[int, int] | None:
        found = self.connection().execute(_LOCATE, (host_id, episode_id)).fetchone()
        return None if found is None else (found[0], found[1])

    def host_summaries(self) -> dict[str, HostSummary]:
        cursor = self.connection().execute("SELECT * FROM hosts")
        return {
            host: HostSummary(eps, size, seen, commit) for host, eps, size, seen, commit in cursor
        }

    def commit_totals(self) -> dict[str | None, tuple[int, int]]:
        cursor = self.connection().execute("SELECT * FROM commits")
        return {commit or None: (episodes, size) for commit, episodes, size in cursor}


def _upgrade(conn: sqlite3.Connection, version: int, path: Path) -> None:
    """A view of an older schema: its derived tables are dropped and built again from the file
    (the next catch-up starts at offset 0); rejections and stale marks are kept."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another worker may have upgraded it while this one waited for the lock.
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            log.warning(
                "index view %s has schema %d, not %d; rebuilding it", path, version, SCHEMA_VERSION
            )
            for table in DERIVED_TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 - fixed names
            conn.execute("DROP TABLE IF EXISTS position")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _refuse_truncated(path: Path) -> None:
    """A file shorter than its header's page count lost pages (cheap: one 100-byte read).

    Only meaningful with no write-ahead log pending, which may hold pages the file lacks.
    """
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        return
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        if header:
            raise sqlite3.DatabaseError("not a SQLite database")
        return
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    counted = header[24:28] == header[92:96]  # the header's page count is valid
    if counted and size < pages * page_size:
        raise sqlite3.DatabaseError(f"truncated: {size} bytes, header says {pages} pages")


def _add_totals(conn: sqlite3.Connection, rows: list[IndexRow]) -> None:
    """Fold rows into the per-host and per-commit totals (one upsert per host and commit).

    Per row only dict lookups and additions (this runs for every row of a build)."""
    episodes: dict[str, int] = {}
    sizes: dict[str, int] = {}
    latest: dict[str, tuple[str, str | None]] = {}
    commit_episodes: dict[str, int] = {}
    commit_sizes: dict[str, int] = {}
    for row in rows:
        host, size, commit = row.host_id, row.size_bytes, row.commit or ""
        if host in episodes:
            episodes[host] += 1
            sizes[host] += size
            if row.received_at_wall >= latest[host][0]:
                latest[host] = (row.received_at_wall, row.commit)
        else:
            episodes[host] = 1
            sizes[host] = size
            latest[host] = (row.received_at_wall, row.commit)
        if commit in commit_episodes:
            commit_episodes[commit] += 1
            commit_sizes[commit] += size
        else:
            commit_episodes[commit] = 1
            commit_sizes[commit] = size
    conn.executemany(
        _HOST_UPSERT,
        ((host, count, sizes[host], *latest[host]) for host, count in episodes.items()),
    )
    conn.executemany(
        _COMMIT_UPSERT,
        ((commit, count, commit_sizes[commit]) for commit, count in commit_episodes.items()),
    )
