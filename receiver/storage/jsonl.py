"""The jsonl catalogue: index.jsonl, one sorted-key JSON row per stored episode.

Exactly one row per (host, episode): every writer catches up on rows appended
by other processes and checks for an existing row under an inter-process lock
(flock on index.jsonl.lock), then appends with one write and fsync. A torn last
line (a writer died mid-append) is cut off, kept in a side file, before anyone
appends after it. Readers consume complete lines only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import operator
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from episode_common.durable import atomic_write, fsync_dir
from receiver import failpoints
from receiver.storage.base import CatalogueCorrupt, CatalogueState, DurabilityError
from receiver.storage.episode_locks import EpisodeLocks
from receiver.storage.rows import (
    HostSummary,
    IndexRow,
    decode_row,
    decode_rows,
    encode_row,
    summarise_hosts,
)

log = logging.getLogger(__name__)

_row_key = operator.attrgetter("host_id", "episode_id")


def _decode_lines(data: bytes) -> list[IndexRow] | None:
    """The rows of complete lines in one C call, or None unless every line is exactly one row.

    decode_lines alone would also take blank lines and two rows on one line; the shape
    check (each line is `{...}`, as many rows as lines) leaves only one-row lines.
    """
    if not data:
        return []
    try:
        rows = decode_rows(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    lines = data.count(b"\n")
    shaped = data.startswith(b"{") and data.endswith(b"}\n")
    if not shaped or len(rows) != lines or data.count(b"}\n{") != lines - 1:
        return None
    return rows


@dataclass
class _Append:
    """One caller's row in a group commit, and what came of it."""

    row: IndexRow
    result: tuple[IndexRow, bool] | None = None
    error: BaseException | None = None


class JsonlCatalogue:
    """index.jsonl with an in-memory view, shared safely by several processes.

    Claims are byte-range locks in claims_path, shared with every writer of this data_dir.
    """

    def __init__(self, path: Path, claims_path: Path | None = None) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._claims_path = claims_path or path.with_name("episodes.lock")
        self._claims: EpisodeLocks | None = None
        self._view: dict[tuple[str, str], IndexRow] = {}
        self._offset = 0
        self._inode: int | None = None
        self._skipped_lines = 0
        self._loaded = False
        # One thread at a time catches up or appends; other processes are kept out by flock.
        self._mutex = threading.Lock()
        # Rows waiting for the next group commit (append_if_absent).
        self._queue: list[_Append] = []
        self._queue_lock = threading.Lock()

    # -- the Catalogue interface ---------------------------------------------------

    def recover(self, *, repair: bool = True) -> CatalogueState:
        """Cut a torn tail (repair=False: only measure it), then load every row strictly."""
        if repair:
            with self.locked():
                torn = self.repair_torn_tail()
        else:
            torn = self.torn_tail_bytes()
        self.load(strict=True)
        return CatalogueState(rows=len(self), torn_tail_bytes=torn)

    def open(self) -> None:
        self.load_once()

    def close(self) -> None:
        if self._claims is not None:
            self._claims.close()
            self._claims = None

    def lookup(self, host_id: str, episode_id: str) -> IndexRow | None:
        self.refresh()
        return self._view.get((host_id, episode_id))

    def claim(self, host_id: str, episode_id: str) -> bool:
        if self._claims is None:
            self._claims = EpisodeLocks(self._claims_path)
        return self._claims.try_acquire(host_id, episode_id)

    def release(self, host_id: str, episode_id: str) -> None:
        if self._claims is not None:
            self._claims.release(host_id, episode_id)

    def count(self) -> int:
        self.refresh()
        return len(self._view)

    def iter_rows(self) -> Iterator[IndexRow]:
        self.refresh()
        return iter(list(self._view.values()))

    def host_summaries(self) -> dict[str, HostSummary]:
        self.refresh()
        return summarise_hosts(list(self._view.values()))

    def unready_reason(self) -> str | None:
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            return f"catalogue: {self.path.parent} is missing or not writable"
        return None

    def rows_after(self, key: tuple[str, str] | None) -> Iterator[IndexRow]:
        """File order is commit order. A line counts when it is the row in force for its key
        (not a later duplicate): lookups decide, so no set of every key seen is kept."""
        self.refresh()
        if key is not None and key not in self._view:
            raise KeyError(key)
        return self._rows_after(key, self._offset)

    def _rows_after(self, key: tuple[str, str] | None, end: int) -> Iterator[IndexRow]:
        found = key is None
        for row in _rows_of(self.path, end):
            if self._view.get(row.key) != row:
                continue
            if found:
                yield row
            elif row.key == key:
                found = True

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._view)

    def rows(self) -> Iterator[IndexRow]:
        return iter(list(self._view.values()))

    def load(self, *, strict: bool = True) -> None:
        """Read the whole file. strict: a corrupt complete line raises IndexCorrupt."""
        with self._mutex:
            self._view.clear()
            self._offset = 0
            self._inode = None
            self._catch_up(strict=strict)
            self._loaded = True

    def load_once(self) -> None:
        """Load leniently, or only catch up when this view was loaded already (handed over)."""
        if self._loaded:
            self.refresh()
        else:
            self.load(strict=False)

    def refresh(self) -> None:
        """Pick up rows appended by other processes since the last look."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_size == self._offset and stat.st_ino == self._inode:
            return
        with self._mutex:
            self._catch_up(strict=False)

    def _catch_up(self, *, strict: bool) -> None:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            stat = os.fstat(handle.fileno())
            if self._inode is not None and stat.st_ino != self._inode:
                # Replaced (e.g. restored from backup): start over.
                log.warning("index %s was replaced; reloading it", self.path)
                self._view.clear()
                self._offset = 0
            self._inode = stat.st_ino
            handle.seek(self._offset)
            data = handle.read(max(0, stat.st_size - self._offset))
        end = data.rfind(b"\n") + 1  # only complete lines; a torn tail waits
        complete = data[:end]
        rows = _decode_lines(complete)
        if rows is not None:
            self._add(rows)
            self._offset += end
            return
        # Some line is not exactly one row: go line by line to name it.
        line_start = 0
        for raw in complete.splitlines(keepends=True):
            try:
                row = decode_row(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                line_number = self._count_lines_before(self._offset + line_start) + 1
                if strict:
                    raise CatalogueCorrupt(
                        f"{self.path}: line {line_number} is not an index row ({error}); "
                        "move the line aside or restore the index, then start again"
                    ) from None
                self._skipped_lines += 1
                log.error("index line %d is not a row, skipped: %s", line_number, error)
            else:
                self._view.setdefault(row.key, row)
            line_start += len(raw)
        self._offset += end

    def _add(self, rows: list[IndexRow]) -> None:
        """Add rows in file order; the first row of a key stays in force."""
        if self._view:
            for row in rows:
                self._view.setdefault(row.key, row)
        else:
            # A whole file at once: built in C. Reversed, so that the first row of a key wins.
            self._view.update(zip(map(_row_key, reversed(rows)), reversed(rows), strict=True))

    def _count_lines_before(self, offset: int) -> int:
        with self.path.open("rb") as handle:
            return handle.read(offset).count(b"\n")

    # -- writing -----------------------------------------------------------------

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
            return size - _end_of_last_complete_line(fd, size)
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
            if size == 0:
                return 0
            keep = _end_of_last_complete_line(fd, size)
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

    def append_if_absent(self, row: IndexRow) -> tuple[IndexRow, bool]:
        """Append row unless (host, episode) has one; returns (the row in force, appended?).

        Group commit: threads of this process that append at the same time share one write
        and one fsync. Whoever gets the lock appends every row queued by then; each caller
        returns only once its row is on disk (or raises the error that write met).
        """
        request = _Append(row)
        with self._queue_lock:
            self._queue.append(request)
        with self._mutex:
            if request.result is None and request.error is None:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _commit(self, batch: list[_Append]) -> None:
        """Under the mutex: decide every queued row, append the new ones with one fsync."""
        try:
            with self.locked():
                self._catch_up(strict=False)
                new: dict[tuple[str, str], IndexRow] = {}
                for request in batch:
                    key = request.row.key
                    existing = self._view.get(key)
                    if existing is None:
                        existing = new.get(key)
                    if existing is None:
                        new[key] = request.row
                        request.result = (request.row, True)
                    else:
                        request.result = (existing, False)
                if new:
                    self.repair_torn_tail()
                    self._append_line(b"".join(map(encode_row, new.values())))
                    self._view.update(new)
        except BaseException as error:
            for request in batch:
                request.result, request.error = None, error

    def _append_line(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        created = False
        try:
            before = os.fstat(fd).st_size
            created = before == 0 and self._inode is None
            try:
                failpoints.torn_write(failpoints.DURING_INDEX_APPEND, fd, line)
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write to index ({written} of {len(line)} bytes)")
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
            stat = os.fstat(fd)
            self._inode = stat.st_ino
            self._offset = before + len(line) if before == self._offset else self._offset
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)


def _rows_of(path: Path, end: int) -> Iterator[IndexRow]:
    """The rows of the complete lines before byte `end`, in file order; other lines skipped."""
    with path.open("rb") as handle:
        position = 0
        for line in handle:
            position += len(line)
            if position > end:
                return
            try:
                yield decode_row(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue


def _end_of_last_complete_line(fd: int, size: int) -> int:
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
