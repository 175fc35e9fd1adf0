"""A raw, read-only reading of index.jsonl for auditing: every line with its number.

Unlike JsonlCatalogue (one row per episode) it keeps duplicates, lines that are not rows and a
torn last line. The writers' lock is held shared only around one fstat, so that a row being
appended is not taken for a torn tail. Memory: the rows plus at most MAX_LINE bytes a line.
"""

from __future__ import annotations

import fcntl
import os
from collections import defaultdict
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


def read_index_snapshot(index_path: Path) -> IndexSnapshot:
    """Every line of the index as it is now; a missing index is an empty one."""
    snapshot = IndexSnapshot()
    try:
        handle = index_path.open("rb")
    except FileNotFoundError:
        return snapshot
    with handle:
        remaining = _snapshot_size(handle.fileno(), index_path.with_name(index_path.name + ".lock"))
        number = 0
        while remaining > 0:
            raw = handle.readline(min(remaining, MAX_LINE))
            if not raw:
                break  # cut shorter since the snapshot (a torn tail repaired meanwhile)
            remaining -= len(raw)
            snapshot.size += len(raw)
            number += 1
            if raw.endswith(b"\n"):
                parsed = _parse(raw)
                if isinstance(parsed, str):
                    preview = raw[:PREVIEW].decode(errors="replace").rstrip("\n")
                    snapshot.bad_lines.append(BadLine(number, parsed, preview))
                else:
                    snapshot.rows.append(NumberedRow(number, parsed))
            elif remaining == 0:
                snapshot.torn_tail = TornTail(number, len(raw))
            else:
                skipped = _skip_rest_of_line(handle, remaining)
                remaining -= skipped
                snapshot.size += skipped
                error = f"line longer than {MAX_LINE} bytes"
                snapshot.bad_lines.append(BadLine(number, error))
    return snapshot


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
