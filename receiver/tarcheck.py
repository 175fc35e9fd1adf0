"""Validate an uploaded .tar.zst while it streams in: zstd integrity, safe tar members, meta.json.

Memory stays at a few MiB plus the zstd window (capped by max_window_bytes) whatever the
input: output is decompressed in bounded pieces, counted against max_unpacked_bytes, and
only meta.json (at most 1 MiB) is ever held whole. Raises InvalidTarball with a short detail.
"""

from __future__ import annotations

import json
import tarfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from episode_common.archive import ArchiveLayoutError, MetaLocator
from receiver.config import StorageConfig
from receiver.errors import InvalidTarball
from receiver.zstd_stream import Aborted, ForwardReader, Inflater

# A body of at most this many (compressed) bytes is checked by finish(), without a thread.
INLINE_BYTES = 1 << 20
META_MAX_BYTES = 1 << 20
READ_BYTES = 1 << 20  # read_meta_commit's read size
_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


@dataclass(frozen=True)
class TarSummary:
    meta_commit: str | None  # code_version.commit as written; None unless validate = "tar"
    members: int
    unpacked_bytes: int


class _BadMeta(InvalidTarball):
    """meta.json is there but unusable: read_meta_commit answers None instead."""


class _TarWalk(tarfile.TarFile):
    # Undocumented but stable: next() appends every TarInfo here; we empty it as we go.
    members: list[tarfile.TarInfo]


def _check_member(info: tarfile.TarInfo) -> None:
    name = info.name
    if not name:
        raise InvalidTarball("member with an empty name")
    if name.startswith("/"):
        raise InvalidTarball(f"member {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise InvalidTarball(f"member {name!r} escapes the archive")
    if not (info.isreg() or info.isdir()):
        kind = _KINDS.get(info.type, f"special member (type {info.type.decode(errors='replace')})")
        raise InvalidTarball(f"member {name!r} is a {kind}; only files and directories allowed")


def _meta_commit(tar: _TarWalk, info: tarfile.TarInfo) -> str | None:
    """code_version.commit as written (None when meta.json names none)."""
    if not info.isreg():
        raise _BadMeta("meta.json is not a regular file")
    if info.size > META_MAX_BYTES:
        raise _BadMeta("meta.json is larger than 1 MiB")
    member = tar.extractfile(info)
    raw = member.read() if member is not None else b""  # zstd/tar errors: not _BadMeta
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _BadMeta("meta.json is not valid JSON") from None
    version = meta.get("code_version") if isinstance(meta, dict) else None
    commit = version.get("commit") if isinstance(version, dict) else None
    if commit is not None and not isinstance(commit, str):
        raise _BadMeta("meta.json code_version.commit is not a string")
    return commit


def _read_candidate(tar: _TarWalk, info: tarfile.TarInfo) -> str | None | _BadMeta:
    try:
        return _meta_commit(tar, info)
    except _BadMeta as error:
        return error


def _walk(reader: ForwardReader, storage: StorageConfig, *, strict: bool) -> tuple[str | None, int]:
    """(meta.json's commit, member count), meta.json found by the shared layout rule.

    strict: vet every member and refuse an archive without one usable meta.json; otherwise
    answer None for those, and stop early once a top-level meta.json settles the layout.
    """
    locator = MetaLocator()
    candidates: dict[str, str | None | _BadMeta] = {}
    members = 0
    try:
        # "r:" rather than "r|": stream mode skips member data in 10 KiB reads and copies;
        # "r:" seeks, and ForwardReader.seek drops whole pieces. Neither ever seeks back.
        tar = _TarWalk.open(fileobj=reader, mode="r:")
        while (info := tar.next()) is not None:
            tar.members.clear()  # a million kept TarInfos would not be bounded memory
            members += 1
            if strict:
                if members > storage.max_members:
                    raise InvalidTarball(f"more than {storage.max_members} members")
                _check_member(info)
            place = locator.observe(info.name)
            if place is not None:
                candidates[place] = _read_candidate(tar, info)
                if not strict and locator.settled_at_top:
                    break
    except tarfile.TarError as error:
        raise InvalidTarball(f"tar: {error}") from None
    try:
        found = candidates[locator.finish()]
    except ArchiveLayoutError as error:
        if strict:
            raise InvalidTarball(str(error)) from None
        return None, members
    if isinstance(found, _BadMeta):
        if strict:
            raise found
        return None, members
    return found, members


def _validate(
    chunks: Iterable[bytes], storage: StorageConfig, stop: threading.Event | None = None
) -> TarSummary:
    inflater = Inflater(chunks, storage, stop)
    reader = ForwardReader(inflater.pieces())
    commit, members = None, 0
    if storage.validate == "tar":
        commit, members = _walk(reader, storage, strict=True)
    reader.drain()
    return TarSummary(commit, members, inflater.produced)


def validate_stream(chunks: Iterable[bytes], storage: StorageConfig) -> TarSummary:
    """Validate a whole body synchronously; with validate = "none" the chunks are not read."""
    if storage.validate == "none":
        return TarSummary(None, 0, 0)
    return _validate(chunks, storage)


def read_meta_commit(fileobj: BinaryIO, storage: StorageConfig) -> str | None:
    """meta.json's code_version.commit of a stored .tar.zst, reading only up to meta.json.

    None when there is no meta.json or it has no usable commit (the commit is unknown);
    InvalidTarball when the zstd or tar stream before it is broken. Members are not vetted.
    """
    chunks = iter(lambda: fileobj.read(READ_BYTES), b"")
    reader = ForwardReader(Inflater(chunks, storage).pieces())
    return _walk(reader, storage, strict=False)[0]


class _Channel:
    """Bounded hand-off of chunks to the worker; cancel() releases both sides at once."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[bytes] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._closed = False
        self.cancelled = threading.Event()

    def put(self, chunk: bytes) -> None:
        with self._cond:
            while len(self._items) >= self._capacity and not self.cancelled.is_set():
                self._cond.wait()
            if not self.cancelled.is_set():
                self._items.append(chunk)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled.set()
            self._items.clear()
            self._cond.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._items and not self._closed and not self.cancelled.is_set():
                    self._cond.wait()
                if self.cancelled.is_set():
                    raise Aborted
                if not self._items:
                    return
                chunk = self._items.popleft()
                self._cond.notify_all()
            yield chunk


class StreamValidator:
    """Validates a .tar.zst fed chunk by chunk from another thread, in its own worker thread.

    Holds at most queue_chunks chunks plus the bounded decompression state. The worker
    starts once more than inline_bytes have been fed: a smaller body (most episodes of a
    busy small-upload load) is held and checked by finish() in the caller's thread, since
    a thread per upload costs more than it overlaps; abort() stops that check as promptly.
    With validate = "none" no thread is started and everything is accepted.
    """

    def __init__(
        self, storage: StorageConfig, *, queue_chunks: int = 8, inline_bytes: int = INLINE_BYTES
    ) -> None:
        self._storage = storage
        self._enabled = storage.validate != "none"
        self._channel = _Channel(queue_chunks)
        self._summary: TarSummary | None = None
        self._error: InvalidTarball | None = None
        self._crash: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._held: list[bytes] | None = [] if self._enabled else None
        self._held_bytes = 0
        self._inline_bytes = inline_bytes

    def _start(self) -> None:
        """Hand what was held to a worker thread, which validates from here on."""
        held, self._held = self._held or [], None
        self._thread = threading.Thread(target=self._run, name="tarcheck", daemon=True)
        self._thread.start()
        for chunk in held:
            self._channel.put(chunk)

    def _run(self) -> None:
        try:
            self._summary = _validate(self._channel, self._storage, self._channel.cancelled)
        except InvalidTarball as error:
            self._error = error
        except Aborted:
            pass
        except BaseException as error:  # a bug, not a bad upload: finish() re-raises it
            self._crash = error
        finally:
            # Unblocks a producer waiting in feed() and makes later feeds drop their data.
            self._channel.cancel()

    @property
    def failed(self) -> InvalidTarball | None:
        """The rejection, as soon as the worker has found one: the caller may stop early."""
        return self._error

    def feed(self, chunk: bytes) -> None:
        """Queue a chunk; blocks while the queue is full, drops data once validation stopped."""
        if not chunk:
            return
        held = self._held  # abort() may drop it meanwhile: then this chunk goes with it
        if held is not None:
            held.append(chunk)
            self._held_bytes += len(chunk)
            if self._held_bytes > self._inline_bytes:
                self._start()
        elif self._thread is not None:
            self._channel.put(chunk)

    def finish(self) -> TarSummary:
        """End of input: wait for the verdict; InvalidTarball when rejected (or aborted)."""
        if self._held is not None:  # a small body: check it here
            held, self._held = self._held, None
            try:
                return _validate(held, self._storage, self._channel.cancelled)
            except Aborted:
                raise InvalidTarball("validation aborted") from None
        if self._thread is None:
            if self._enabled and self._channel.cancelled.is_set():
                raise InvalidTarball("validation aborted")
            return TarSummary(None, 0, 0)
        self._channel.close()
        self._thread.join()
        if self._crash is not None:
            raise self._crash
        if self._error is not None:
            raise self._error
        if self._summary is None:
            raise InvalidTarball("validation aborted")
        return self._summary

    def abort(self) -> None:
        """Stop the worker (or finish()'s own check) within one decompressed piece; idempotent,
        safe at any time."""
        self._held = None
        self._channel.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
