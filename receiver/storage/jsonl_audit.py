"""A raw, read-only reading of index.jsonl for auditing: every line with its number.

Unlike JsonlCatalogue (one row per episode) it keeps duplicates, lines that are not rows and a
torn last line. The writers' lock is held shared only around one fstat, so that a row being
appended is not taken for a torn tail. Memory: the rows plus at most MAX_LINE bytes a line.
IndexAudit reads the same lines in one pass and keeps no rows: episode-verify uses it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections import defaultdict
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgspec

from episode_common.wire import ID_RULE, is_valid_id
from receiver.storage.rows import IndexRow, decode_row

MAX_LINE = 1 << 20  # a row is a few hundred bytes; longer lines are reported, not kept
PREVIEW = 80


@dataclass(frozen=True)
class NumberedRow:
    line: int
    row: IndexRow


@dataclass(frozen=True)
class BadLine:
    line: int
    error: str
    preview: str = ""  # the line's start, so that a person can find and judge it


@dataclass(frozen=True)
class TornTail:
    """A last line with no newline: a writer died mid-append (the receiver cuts it at start)."""

    line: int
    size: int


@dataclass
class IndexSnapshot:
    rows: list[NumberedRow] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    torn_tail: TornTail | None = None
    size: int = 0

    def by_key(self, host: str | None = None) -> dict[tuple[str, str], list[NumberedRow]]:
        """Rows per (host, episode) in file order; the first is the one in force (as in
        JsonlCatalogue, which keeps the first row it reads for a key)."""
        grouped: dict[tuple[str, str], list[NumberedRow]] = defaultdict(list)
        for numbered in self.rows:
            if host is None or numbered.row.host_id == host:
                grouped[numbered.row.key].append(numbered)
        return dict(grouped)


def _parse(raw: bytes) -> IndexRow | str:
    try:
        row = decode_row(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return str(error)
    for kind, value in (("host_id", row.host_id), ("episode_id", row.episode_id)):
        if not is_valid_id(value):
            return f"{kind} must match {ID_RULE}"
    return row


def _snapshot_size(fd: int, lock_path: Path) -> int:
    """The index size with no append in progress: writers append under flock(lock_path)."""
    try:
        lock_fd = os.open(lock_path, os.O_RDONLY)
    except OSError:  # no writer has ever run here, or we may not open it: read as is
        return os.fstat(fd).st_size
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        return os.fstat(fd).st_size
    finally:
        os.close(lock_fd)


def _open_snapshot(index_path: Path) -> tuple[BinaryIO, int] | None:
    """The index opened, and its size with no append in progress (None: no index)."""
    try:
        handle = index_path.open("rb")
    except FileNotFoundError:
        return None
    try:
        lock_path = index_path.with_name(index_path.name + ".lock")
        return handle, _snapshot_size(handle.fileno(), lock_path)
    except BaseException:
        handle.close()
        raise


def _lines(handle: BinaryIO, remaining: int) -> Iterator[tuple[int, int, bytes, str]]:
    """(line number, offset, bytes, kind) for each of the first `remaining` bytes' lines;
    kind is "line" (complete, newline included), "torn" (the last, no newline) or "long"
    (longer than MAX_LINE: its first bytes only, the rest skipped). Memory: one line."""
    number = offset = 0
    while remaining > 0:
        raw = handle.readline(min(remaining, MAX_LINE))
        if not raw:
            break  # cut shorter since the snapshot (a torn tail repaired meanwhile)
        remaining -= len(raw)
        number += 1
        if raw.endswith(b"\n"):
            yield number, offset, raw, "line"
            offset += len(raw)
        elif remaining == 0:
            yield number, offset, raw, "torn"
            offset += len(raw)
        else:
            skipped = _skip_rest_of_line(handle, remaining)
            remaining -= skipped
            yield number, offset, raw, "long"
            offset += len(raw) + skipped


def _bad_line(number: int, raw: bytes, error: str) -> BadLine:
    return BadLine(number, error, raw[:PREVIEW].decode(errors="replace").rstrip("\n"))


def read_index_snapshot(index_path: Path) -> IndexSnapshot:
    """Every line of the index as it is now; a missing index is an empty one."""
    snapshot = IndexSnapshot()
    opened = _open_snapshot(index_path)
    if opened is None:
        return snapshot
    handle, remaining = opened
    with handle:
        for number, _, raw, kind in _lines(handle, remaining):
            if kind == "line":
                parsed = _parse(raw)
                if isinstance(parsed, str):
                    snapshot.bad_lines.append(_bad_line(number, raw, parsed))
                else:
                    snapshot.rows.append(NumberedRow(number, parsed))
            elif kind == "torn":
                snapshot.torn_tail = TornTail(number, len(raw))
            else:
                snapshot.bad_lines.append(BadLine(number, f"line longer than {MAX_LINE} bytes"))
        snapshot.size = handle.tell()
    return snapshot


_FIRST_SCHEMA = """
CREATE TABLE first (host_id TEXT NOT NULL, episode_id TEXT NOT NULL, line INTEGER NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, PRIMARY KEY (host_id, episode_id))
    WITHOUT ROWID
"""
_INSERT_FIRST = "INSERT OR IGNORE INTO first VALUES (?, ?, ?, ?, ?)"
_AUDIT_CHUNK = 8192  # rows inserted per executemany


class IndexAudit:
    """One streamed pass over the index for an audit, memory flat in the number of rows.

    Like read_index_snapshot, but the rows are not kept: a private view (a temporary SQLite
    file, deleted when closed, never in the data_dir) holds the first line of each key with
    its number, offset and length, and a row is read back from the file when asked for. A
    line whose key already has a first line is a duplicate; duplicates, lines that are not
    rows and a torn tail are kept in memory as found (they are the problems reported).
    Read-only: nothing in the store is written, no write lock is taken.
    """

    def __init__(self, index_path: Path, host: str | None = None) -> None:
        self.host = host
        self.rows = 0  # lines that are rows (of host, if given), duplicates included
        self.bad_lines: list[BadLine] = []
        self.torn_tail: TornTail | None = None
        self._later: dict[tuple[str, str], list[NumberedRow]] = {}  # duplicates past the first
        self._conn = sqlite3.connect("", isolation_level=None)  # private, deleted on close
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute("PRAGMA cache_size=-16384")  # 16 MiB, then pages go to disk
        self._conn.execute(_FIRST_SCHEMA)
        self._handle: BinaryIO | None = None
        self._end = 0  # where the complete lines read so far end
        self._lines = 0
        opened = _open_snapshot(index_path)
        if opened is None:
            return
        self._handle, remaining = opened
        self._conn.execute("BEGIN")
        pending: list[tuple[str, str, int, int, int]] = []
        for number, offset, raw, kind in _lines(self._handle, remaining):
            if kind == "line":
                self._end, self._lines = offset + len(raw), number
                parsed = _parse(raw)
                if isinstance(parsed, str):
                    self.bad_lines.append(_bad_line(number, raw, parsed))
                elif host is None or parsed.host_id == host:
                    self.rows += 1
                    pending.append((*parsed.key, number, offset, len(raw)))
                    if len(pending) >= _AUDIT_CHUNK:
                        self._insert(pending, report=True)
                        pending = []
            elif kind == "torn":
                self.torn_tail = TornTail(number, len(raw))
            else:
                self._end, self._lines = offset + len(raw), number
                self.bad_lines.append(BadLine(number, f"line longer than {MAX_LINE} bytes"))
        self._insert(pending, report=True)
        self._conn.execute("COMMIT")

    def __enter__(self) -> IndexAudit:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _insert(self, values: list[tuple[str, str, int, int, int]], *, report: bool) -> None:
        """Add first lines; a key seen before is a duplicate (recorded when report)."""
        before = self._conn.total_changes
        self._conn.executemany(_INSERT_FIRST, values)
        if self._conn.total_changes - before == len(values):
            return
        # Some key was there already: find which by their stored line (rare: a problem).
        for host_id, episode_id, line, offset, length in values:
            first = self._first((host_id, episode_id))
            if report and first is not None and first[0] != line:
                row = self._read(offset, length)
                self._later.setdefault((host_id, episode_id), []).append(NumberedRow(line, row))

    def _first(self, key: tuple[str, str]) -> tuple[int, int, int] | None:
        found = self._conn.execute(
            "SELECT line, offset, length FROM first WHERE host_id=? AND episode_id=?", key
        ).fetchone()
        return None if found is None else (found[0], found[1], found[2])

    def _read(self, offset: int, length: int) -> IndexRow:
        assert self._handle is not None
        raw = os.pread(self._handle.fileno(), length, offset)
        parsed = _parse(raw)
        if isinstance(parsed, str):  # the file changed under us since it was read
            raise OSError(f"index line at offset {offset} changed while being audited")
        return parsed

    def lookup(self, key: tuple[str, str]) -> NumberedRow | None:
        """The row in force for key (its first line), read back from the file."""
        first = self._first(key)
        return None if first is None else NumberedRow(first[0], self._read(first[1], first[2]))

    def duplicates(self) -> list[list[NumberedRow]]:
        """Every key with more than one row: all its rows in file order, the first in force."""
        groups = []
        for key, later in self._later.items():
            first = self.lookup(key)
            assert first is not None
            groups.append([first, *later])
        return groups

    def rows_not_in(self, keys: Container[tuple[str, str]]) -> Iterator[NumberedRow]:
        """The row in force of every key not in keys, streamed in key order."""
        cursor = self._conn.execute(
            "SELECT host_id, episode_id, line, offset, length FROM first ORDER BY 1, 2"
        )
        for host_id, episode_id, line, offset, length in cursor:
            if (host_id, episode_id) not in keys:
                yield NumberedRow(line, self._read(offset, length))

    def catch_up(self) -> None:
        """Add the rows appended since the pass (for lookups only: nothing more is reported).

        A receiver links a file before it appends the row: a file with no row may just be
        newer than the pass."""
        if self._handle is None:
            return
        fd = self._handle.fileno()
        self._handle.seek(self._end)
        remaining = os.fstat(fd).st_size - self._end
        pending = []
        for number, offset, raw, kind in _lines(self._handle, remaining):
            if kind != "line":
                continue
            parsed = _parse(raw)
            if not isinstance(parsed, str) and (self.host is None or parsed.host_id == self.host):
                pending.append((*parsed.key, self._lines + number, self._end + offset, len(raw)))
        self._insert(pending, report=False)


def _skip_rest_of_line(handle: BinaryIO, remaining: int) -> int:
    """Consume up to and including the next newline without keeping it; bytes consumed."""
    skipped = 0
    while remaining - skipped > 0:
        chunk = handle.readline(min(remaining - skipped, MAX_LINE))
        if not chunk:
            break
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped
