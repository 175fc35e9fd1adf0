"""The jsonl catalogue: index.jsonl is the record, a SQLite view beside it answers lookups.

Exactly one row per (host, episode): under the inter-process lock (flock on
index.jsonl.lock) a writer catches the view up on rows other processes appended, checks
for an existing row, appends with one write and fsync, then records the rows in the view.
Memory and start-up time do not grow with the rows (receiver.storage.jsonl_view).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from receiver import failpoints
from receiver.storage import jsonl_marks
from receiver.storage.base import CatalogueState, DurabilityError
from receiver.storage.episode_locks import EpisodeLocks
from receiver.storage.jsonl_file import IndexFile, batches, end_of_last_complete_line, read_row
from receiver.storage.jsonl_sync import sync_view
from receiver.storage.jsonl_view import (
    HEAD_BYTES,
    Batch,
    Position,
    ViewDatabase,
    is_corrupt,
    view_path_for,
)
from receiver.storage.marks import CommitSummary, Rejection, StaleMark, StaleRefusal
from receiver.storage.rows import HostSummary, IndexRow, encode_row

log = logging.getLogger(__name__)

PENDING_SCAN_BYTES = 1 << 20  # a lookup reads at most this much of the file past the view
_TOO_MUCH = object()


@dataclass
class _Append:
    """One caller's row in a group commit, and what came of it."""

    row: IndexRow
    result: tuple[IndexRow, bool] | None = None
    error: BaseException | None = None


class JsonlCatalogue:
    """index.jsonl and its view, shared safely by several processes.

    Claims are byte-range locks in claims_path, shared with every writer of this data_dir.
    """

    def __init__(
        self, path: Path, claims_path: Path | None = None, view_path: Path | None = None
    ) -> None:
        self.path = path
        self.file = IndexFile(path)
        self.lock_path = self.file.lock_path
        self.view = ViewDatabase(view_path or view_path_for(path))
        self._claims_path = claims_path or path.with_name("episodes.lock")
        self._claims: EpisodeLocks | None = None
        self._reader: tuple[int, int] | None = None  # (inode, fd) of index.jsonl for preads
        # One thread at a time catches up or appends; other processes are kept out by flock.
        self._mutex = threading.Lock()
        # Rows waiting for the next group commit (append_if_absent).
        self._queue: list[_Append] = []
        self._queue_lock = threading.Lock()

    # -- the Catalogue interface ---------------------------------------------------

    def recover(self, *, repair: bool = True) -> CatalogueState:
        """Cut a torn tail (repair=False: only measure it), then bring the view up to date,
        checking strictly every row it has not seen yet."""
        with self.locked():
            torn = self.file.repair_torn_tail() if repair else self.file.torn_tail_bytes()
        self.load(strict=True)
        return CatalogueState(rows=self.count(), torn_tail_bytes=torn)

    def open(self) -> None:
        self.refresh()

    def close(self) -> None:
        if self._claims is not None:
            self._claims.close()
            self._claims = None
        with self.view.lock:
            self.view.close()
            if self._reader is not None:
                os.close(self._reader[1])
                self._reader = None

    def lookup(self, host_id: str, episode_id: str) -> IndexRow | None:
        for _ in range(3):
            try:
                with self.view.lock:
                    # Position first: a row missing from the view read after it lies past it.
                    position = self.view.position()
                    found = self.view.locate(host_id, episode_id)
                    fd = self._fd_for(position)
            except sqlite3.Error as error:
                self._view_trouble(error)
                continue
            if fd is None:  # the file is not the one the view describes
                self.refresh()
                continue
            if found is None:
                pending = self._scan_pending(
                    fd, position, (host_id, episode_id), PENDING_SCAN_BYTES
                )
                if pending is not _TOO_MUCH:
                    return pending  # type: ignore[return-value]
                self.refresh()
                continue
            row = read_row(fd, *found)
            if row is not None and row.key == (host_id, episode_id):
                return row
            log.error("index view points %s/%s at a wrong line; rebuilding", host_id, episode_id)
            self._rebuild()
        raise OSError(f"index view {self.view.path} keeps disagreeing with {self.path}")

    def claim(self, host_id: str, episode_id: str) -> bool:
        if self._claims is None:
            self._claims = EpisodeLocks(self._claims_path)
        return self._claims.try_acquire(host_id, episode_id)

    def release(self, host_id: str, episode_id: str) -> None:
        if self._claims is not None:
            self._claims.release(host_id, episode_id)

    def count(self) -> int:
        return self.refresh().rows

    def host_summaries(self) -> dict[str, HostSummary]:
        self.refresh()
        with self.view.lock:
            return self.view.host_summaries()

    def commit_summaries(self) -> dict[str | None, CommitSummary]:
        self.refresh()
        with self.view.lock:
            totals = self.view.commit_totals()
        return {commit: CommitSummary(*figures) for commit, figures in totals.items()}

    def record_rejection(self, rejection: Rejection) -> None:
        jsonl_marks.record_rejection(self.view, rejection)

    def recent_rejections(self, since: float) -> list[Rejection]:
        return jsonl_marks.recent_rejections(self.view, since)

    def record_stale(self, refusal: StaleRefusal) -> None:
        jsonl_marks.record_stale(self.view, refusal)

    def record_accepted(self, host_id: str, at: float) -> None:
        jsonl_marks.record_accepted(self.view, host_id, at)

    def stale_marks(self, since: float) -> dict[str, StaleMark]:
        return jsonl_marks.stale_marks(self.view, since)

    def unready_reason(self) -> str | None:
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            return f"catalogue: {self.path.parent} is missing or not writable"
        return None

    def rows_after(self, key: tuple[str, str] | None) -> Iterator[IndexRow]:
        """File order is commit order: the rows in force after key's line (the view says where
        it is), duplicates left out, streamed from the file."""
        position = self.refresh()
        start = 0
        if key is not None:
            with self.view.lock:
                found = self.view.locate(*key)
            if found is None:
                raise KeyError(key)
            start = found[0] + found[1]
        return self._rows_from(start, position.offset, dedupe=position.rows != position.lines)

    def iter_rows(self) -> Iterator[IndexRow]:
        """Rows in force, in file order, streamed from the file (duplicates left out)."""
        position = self.refresh()
        return self._rows_from(0, position.offset, dedupe=position.rows != position.lines)

    def _rows_from(self, start: int, end: int, *, dedupe: bool) -> Iterator[IndexRow]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            # lines_before only numbers the lines of log messages: 0 is fine mid-file.
            for batch in batches(fd, start, end, 0, strict=False, path=self.path):
                for row, offset in zip(batch.rows, batch.offsets, strict=True):
                    if not dedupe or self._locate(row)[0] == offset:
                        yield row
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return self.count()

    def rows(self) -> Iterator[IndexRow]:
        return self.iter_rows()

    def load(self, *, strict: bool = True) -> None:
        """Bring the view up to date; strict: a bad line not yet in it raises CatalogueCorrupt."""
        with self.locked(), self._mutex:
            try:
                sync_view(self.view, self.path, strict=strict)
            except sqlite3.Error as error:  # full or failing disk: stop, a restart retries
                raise DurabilityError(f"index view {self.view.path}: {error}") from error

    def refresh(self) -> Position:
        """Catch up on rows other processes appended, if any; where the view now stands."""
        try:
            with self.view.lock:
                position = self.view.position()
                fd = self._fd_for(position)
                if fd is not None and position.mismatch(fd, os.fstat(fd)) is None:
                    if end_of_last_complete_line(fd, os.fstat(fd).st_size) == position.offset:
                        return position
            with self.locked(), self._mutex:
                return sync_view(self.view, self.path, strict=False)
        except sqlite3.Error as error:
            if is_corrupt(error):
                return self._rebuild()
            # Busy or full: answer from the view as it stands (behind by a few rows at most).
            log.warning("index view %s cannot be brought up to date: %s", self.view.path, error)
            with self.view.lock:
                return self.view.position()

    def _fd_for(self, position: Position) -> int | None:
        """A read descriptor of index.jsonl if it is the file the view describes, else None."""
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return None if position.offset else self._null_reader()
        if position.inode is not None and inode != position.inode:
            return None
        if self._reader is None or self._reader[0] != inode:
            if self._reader is not None:
                os.close(self._reader[1])
            self._reader = (inode, os.open(self.path, os.O_RDONLY))
        return self._reader[1]

    def _null_reader(self) -> int:
        if self._reader is None or self._reader[0] != -1:
            self._reader = (-1, os.open(os.devnull, os.O_RDONLY))
        return self._reader[1]

    def _scan_pending(
        self, fd: int, position: Position, key: tuple[str, str], limit: int | None = None
    ) -> IndexRow | None | object:
        """The row of key past the view's position: another writer's, not yet in the view (or
        a view update failed). Normally there is none; more than limit bytes: _TOO_MUCH."""
        end = end_of_last_complete_line(fd, os.fstat(fd).st_size)
        if end <= position.offset:
            return None
        if limit is not None and end - position.offset > limit:
            return _TOO_MUCH
        for batch in batches(
            fd, position.offset, end, position.lines, strict=False, path=self.path
        ):
            for row in batch.rows:
                if row.key == key:
                    return row
        return None

    def _locate(self, row: IndexRow) -> tuple[int, int] | tuple[None, None]:
        with self.view.lock:
            return self.view.locate(row.host_id, row.episode_id) or (None, None)

    def _view_trouble(self, error: sqlite3.Error) -> None:
        if not is_corrupt(error):
            raise error
        self._rebuild()

    def _rebuild(self) -> Position:
        with self.locked(), self._mutex:
            return self._rebuild_held()

    def _rebuild_held(self) -> Position:
        """The view made anew from the file; the caller holds the write lock and the mutex."""
        with self.view.lock:
            self.view.close()
            self.view.remove_files()
            return sync_view(self.view, self.path, strict=False)

    # -- writing -----------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The inter-process write lock; every writer (receiver workers, backfill) takes it."""
        with self.file.locked():
            yield

    def torn_tail_bytes(self) -> int:
        return self.file.torn_tail_bytes()

    def repair_torn_tail(self) -> int:
        """Cut an incomplete last line (keeping a copy beside the index). Call under locked()."""
        return self.file.repair_torn_tail()

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
            with self.file.locked():
                position = self._sync_for_writing()
                new: dict[tuple[str, str], IndexRow] = {}
                for request in batch:
                    key = request.row.key
                    existing = new.get(key) or self._find(key, position)
                    if existing is None:
                        new[key] = request.row
                        request.result = (request.row, True)
                    else:
                        request.result = (existing, False)
                if new:
                    self.file.repair_torn_tail()
                    lines = list(map(encode_row, new.values()))
                    start = self.file.append(b"".join(lines))
                    failpoints.hit(failpoints.BEFORE_VIEW_UPDATE)
                    self._record(list(new.values()), lines, start, position)
        except BaseException as error:
            for request in batch:
                request.result, request.error = None, error

    def _sync_for_writing(self) -> Position:
        """Under the lock: the view caught up, or as it stands when it cannot be written."""
        with self.view.lock:
            try:
                return sync_view(self.view, self.path, strict=False)
            except sqlite3.Error as error:
                log.warning(
                    "index view %s not caught up (%s); reading past it", self.view.path, error
                )
                return self.view.position()

    def _find(self, key: tuple[str, str], position: Position) -> IndexRow | None:
        """Under the write lock: the row in force for key, as lookup() answers it."""
        for _ in range(2):
            with self.view.lock:
                found = self.view.locate(*key)
                fd = self._fd_for(position)
            if fd is None:
                raise OSError(f"{self.path} was replaced while being written")
            if found is None:
                return self._scan_pending(fd, position, key)  # type: ignore[return-value]
            row = read_row(fd, *found)
            if row is not None and row.key == key:
                return row
            # A wrong answer here would append a second row for key, or refuse a new one.
            log.error("index view points %s/%s at a wrong line; rebuilding", *key)
            position = self._rebuild_held()
        raise OSError(f"index view {self.view.path} keeps disagreeing with {self.path}")

    def _record(self, rows: list[IndexRow], lines: list[bytes], start: int, at: Position) -> None:
        """The appended rows into the view; if that fails, the next writer catches up."""
        if start != at.offset:
            return  # the view is behind (it could not be written): catching up will add them
        lengths = list(map(len, lines))
        offsets = [start]
        for length in lengths[:-1]:
            offsets.append(offsets[-1] + length)
        end = start + sum(lengths)
        try:
            with self.view.lock:
                fd = self._fd_for(at)
                assert fd is not None
                head = os.pread(fd, min(HEAD_BYTES, end), 0)
                stat = os.fstat(fd)
                done = Batch(
                    start, end, rows, offsets, lengths, len(rows), head, offsets[-1], lines[-1]
                )
                with self.view.write() as conn:
                    self.view.apply(conn, done, stat)
        except sqlite3.Error as error:
            # The rows are durable in index.jsonl, which wins: the view catches up later.
            log.warning("index view %s not updated (%s); it will catch up", self.view.path, error)
