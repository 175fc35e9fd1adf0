"""The storage seams, and nothing else: a blob store for tarballs and a catalogue of rows.

Callers (ingest, recovery, the status page, the tools) are typed against these only; each
backend lives in its own module. Every method is blocking: callers on the event loop run
them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from receiver.storage.marks import CommitSummary, Rejection, StaleMark, StaleRefusal
from receiver.storage.rows import HostSummary, IndexRow


class DurabilityError(Exception):
    """A write or fsync failed: what is on disk is unknown, so the process must stop."""


class CatalogueCorrupt(Exception):
    """The catalogue holds something that is not a row; a person must look."""


class BackendUnavailable(Exception):
    """A backend server cannot be reached or refuses for now (5xx, throttling): the upload
    is answered 503 with Retry-After and leaves nothing; retrying later may succeed."""

    def __init__(self, message: str, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class CatalogueState:
    """What Catalogue.recover() found."""

    rows: int
    torn_tail_bytes: int = 0  # a torn last row cut off (with repair=False: that would be)


@dataclass(frozen=True)
class StoredBlob:
    """A tarball under its final name, as a listing or a recovery note finds it."""

    host_id: str
    episode_id: str
    size_bytes: int
    where: str  # for messages: a path, an object key
    commit: str | None = None  # what the upload was sent with, when a recovery note says
    note: str | None = None  # the recovery note itself, until forget_note() drops it

    @property
    def key(self) -> tuple[str, str]:
        return (self.host_id, self.episode_id)


@dataclass(frozen=True)
class Stray:
    """Something where blobs live that is not a blob the receiver could have written."""

    where: str
    reason: str


class BlobWriter(Protocol):
    """One upload on its way into the store; nothing is visible under the final name
    until commit(), and abort() leaves nothing behind."""

    @property
    def where(self) -> str: ...

    def write(self, chunks: list[bytes]) -> None: ...

    def commit(self) -> bool:
        """Durable under the final name: True; False when that name was taken (nothing
        of ours is left). Raises DurabilityError when durability is unknown."""
        ...

    def close(self) -> None:
        """After the catalogue row is durable: drop what recovery would have used."""
        ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def prepare(self) -> None: ...

    def open_writer(
        self, host_id: str, episode_id: str, commit: str | None, sha256: str | None = None
    ) -> BlobWriter:
        """sha256: the declared digest, when known before the body (checked before commit);
        a store that must name it up front (s3's object metadata) uses it."""
        ...

    def exists(self, host_id: str, episode_id: str) -> bool: ...

    def where(self, host_id: str, episode_id: str) -> str:
        """Where the blob of this id is (or would be), for messages: a path, an object key."""
        ...

    def digest(self, host_id: str, episode_id: str) -> tuple[str, int]:
        """(sha256 hex, size) of a stored blob."""
        ...

    def open_read(self, host_id: str, episode_id: str) -> BinaryIO: ...

    def scan_blobs(self, host_id: str | None = None) -> Iterator[StoredBlob | Stray]:
        """Every stored blob (one host's with host_id), and what is there but is not one,
        streamed as found (no order promised): memory does not grow with the store."""
        ...

    def recover(self) -> list[StoredBlob]:
        """At start, before serving: drop what a crash left half-written, and return the
        blobs committed by an earlier run whose catalogue row may be missing."""
        ...

    def forget_note(self, blob: StoredBlob) -> None:
        """Drop the recovery note of a blob returned by recover(), once its row is durable."""
        ...

    def free_bytes(self) -> int | None:
        """Free bytes where blobs are written; None when that is not a local disk."""
        ...

    def unready_reason(self, min_free_bytes: int) -> str | None:
        """Why an upload could not be stored now; None when it could (for /readyz)."""
        ...


class Catalogue(Protocol):
    """One row per stored episode; append_if_absent is the exactly-once arbiter."""

    def recover(self, *, repair: bool = True) -> CatalogueState:
        """At start, before serving: repair what a crash left (repair=False: only say what
        it would), check every row (raises CatalogueCorrupt)."""
        ...

    def open(self) -> None:
        """Ready the catalogue for serving in this process."""
        ...

    def close(self) -> None: ...

    def lookup(self, host_id: str, episode_id: str) -> IndexRow | None:
        """The row in force, including rows other writers appended since the last call."""
        ...

    def append_if_absent(self, row: IndexRow) -> tuple[IndexRow, bool]:
        """(the row in force, whether it is this one). Durable before it returns."""
        ...

    def claim(self, host_id: str, episode_id: str) -> bool:
        """Hold the id against other uploads (every process and receiver); False if held."""
        ...

    def release(self, host_id: str, episode_id: str) -> None: ...

    def count(self) -> int: ...

    def iter_rows(self) -> Iterator[IndexRow]: ...

    def host_summaries(self) -> dict[str, HostSummary]: ...

    def unready_reason(self) -> str | None:
        """Why a row could not be written now; None when it could (for /readyz)."""
        ...

    def rows_after(self, key: tuple[str, str] | None) -> Iterator[IndexRow]:
        """Rows in the order they were committed, after the row of key (None: all of them);
        KeyError when key has no row. For export: resumable from the last row copied."""
        ...

    def commit_summaries(self) -> dict[str | None, CommitSummary]:
        """Episodes and bytes per commit (None: rows without one)."""
        ...

    # Recent rejections and stale marks, kept here so that every worker (and a restarted
    # receiver) shows the same; bounded as receiver.storage.marks says.

    def record_rejection(self, rejection: Rejection) -> None: ...

    def recent_rejections(self, since: float) -> list[Rejection]:
        """Newest first, none older than since."""
        ...

    def record_stale(self, refusal: StaleRefusal) -> None: ...

    def record_accepted(self, host_id: str, at: float) -> None:
        """A stored upload: noted on the host's stale mark, if it has one."""
        ...

    def stale_marks(self, since: float) -> dict[str, StaleMark]: ...
