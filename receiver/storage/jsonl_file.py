"""index.jsonl itself: the inter-process write lock, appends, torn tails, and reading lines.

An append is one write and one fsync; a failed one is cut off again, so no reader ever sees
half a row. A torn last line (a writer died mid-append) is cut off, kept in a side file,
before anyone appends after it. Readers consume complete lines only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from episode_common.durable import atomic_write, fsync_dir
from receiver import failpoints
from receiver.storage.base import CatalogueCorrupt, DurabilityError
from receiver.storage.jsonl_view import HEAD_BYTES, Batch
from receiver.storage.rows import IndexRow, decode_row, row_decoder

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # read this much at a time when catching up: memory stays flat
_BAD_ROW = (msgspec.DecodeError, msgspec.ValidationError)


class IndexFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The inter-process write lock; every writer (receiver workers, backfill) takes it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def torn_tail_bytes(self) -> int:
        """Size of an incomplete last line (0 if none); read-only, for reports and dry runs."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            return size - end_of_last_complete_line(fd, size)
        finally:
            os.close(fd)

    def repair_torn_tail(self) -> int:
        """Cut an incomplete last line (keeping a copy beside the index). Call under locked()."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            keep = end_of_last_complete_line(fd, size) if size else 0
            if keep == size:
                return 0
            torn = os.pread(fd, size - keep, keep)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            side = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            atomic_write(side, torn)  # all or nothing: a full disk leaves no empty copy behind
            os.ftruncate(fd, keep)
            os.fsync(fd)
            fsync_dir(self.path.parent)
            log.warning(
                "index had a torn last line (%d bytes); cut it off, copy kept in %s",
                size - keep,
                side,
            )
            return size - keep
        finally:
            os.close(fd)

    def append(self, data: bytes) -> int:
        """Append complete lines with one write and fsync; returns the offset they start at."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                failpoints.torn_write(failpoints.DURING_INDEX_APPEND, fd, data)
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(f"short write to index ({written} of {len(data)} bytes)")
            except OSError as error:
                # Never leave half a row behind for a reader to misread.
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    log.critical("could not cut a failed append off %s", self.path)
                raise DurabilityError(f"append to {self.path} failed: {error}") from error
            try:
                os.fsync(fd)
            except OSError as error:
                raise DurabilityError(f"fsync of {self.path} failed: {error}") from error
        finally:
            os.close(fd)
        if before == 0:
            fsync_dir(self.path.parent)  # the file may be new: its name must be durable too
        return before


def end_of_last_complete_line(fd: int, size: int) -> int:
    """Offset just past the last newline in the file (0 if none)."""
    position = size
    block = 64 * 1024
    while position > 0:
        start = max(0, position - block)
        chunk = os.pread(fd, position - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def read_row(fd: int, offset: int, length: int) -> IndexRow | None:
    """The row of the line at offset, or None when there is no such line (the view is wrong)."""
    raw = os.pread(fd, length, offset)
    if len(raw) != length or not raw.endswith(b"\n"):
        return None
    try:
        return decode_row(raw)
    except _BAD_ROW:
        return None


def batches(
    fd: int, start: int, end: int, lines_before: int, *, strict: bool, path: Path
) -> Iterator[Batch]:
    """The complete lines in [start, end) in chunks, decoded; a line that is not a row is
    skipped with a log line, or (strict) raises CatalogueCorrupt naming it."""
    position, lines_seen = start, lines_before
    while position < end:
        data = os.pread(fd, min(CHUNK_BYTES, end - position), position)
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) < end - position:
                raise OSError(f"{path} shrank while being read")
            data = _whole_line(fd, position, end)  # a line longer than a chunk
            cut = len(data)
        lines = data[:cut].split(b"\n")
        lines.pop()
        lengths = [len(line) + 1 for line in lines]
        offsets = list(itertools.accumulate(lengths[:-1], initial=position))
        try:
            rows = list(map(row_decoder.decode, lines))
        except _BAD_ROW:
            rows, offsets, lengths = _rows_one_by_one(
                lines, offsets, lengths, lines_seen, strict=strict, path=path
            )
        head = os.pread(fd, min(HEAD_BYTES, position + cut), 0)
        yield Batch(
            position, position + cut, rows, offsets, lengths, len(lines), head,
            position + cut - len(lines[-1]) - 1, lines[-1] + b"\n",
        )  # fmt: skip
        position += cut
        lines_seen += len(lines)


def _whole_line(fd: int, position: int, end: int) -> bytes:
    parts = []
    while position < end:
        part = os.pread(fd, min(CHUNK_BYTES, end - position), position)
        parts.append(part)
        position += len(part)
        if b"\n" in part:
            break
    data = b"".join(parts)
    return data[: data.index(b"\n") + 1]


def _rows_one_by_one(
    lines: list[bytes],
    offsets: list[int],
    lengths: list[int],
    lines_seen: int,
    *,
    strict: bool,
    path: Path,
) -> tuple[list[IndexRow], list[int], list[int]]:
    rows, kept_offsets, kept_lengths = [], [], []
    for number, (line, offset, length) in enumerate(zip(lines, offsets, lengths, strict=True)):
        try:
            rows.append(decode_row(line))
        except _BAD_ROW as error:
            line_number = lines_seen + number + 1
            if strict:
                raise CatalogueCorrupt(
                    f"{path}: line {line_number} is not an index row ({error}); "
                    "move the line aside or restore the index, then start again"
                ) from None
            log.error("index line %d is not a row, skipped: %s", line_number, error)
            continue
        kept_offsets.append(offset)
        kept_lengths.append(length)
    return rows, kept_offsets, kept_lengths
