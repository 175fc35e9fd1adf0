"""The queue's data model and on-disk schema: episode states, records, the SQLite file.

State is an explicit enum; the allowed transitions are the Queue's methods.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from shipper.spool import Kind

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    episode_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    commit_id TEXT,
    packed_path TEXT,
    sha256 TEXT,
    size_bytes INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    digest_retries INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    remediation TEXT,
    discovered_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    shipped_at REAL,
    local_deleted_at REAL,
    manifest TEXT,
    changed_files TEXT
);
CREATE INDEX IF NOT EXISTS episodes_by_state ON episodes (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS episodes_by_commit ON episodes (commit_id);
CREATE TABLE IF NOT EXISTS refused_commits (
    commit_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    remediation TEXT,
    refused_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS receiver (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    failures INTEGER NOT NULL,
    next_try REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL
);
"""


# From each older version to this one, run after SCHEMA (which creates only what is missing).
MIGRATIONS = {
    1: "ALTER TABLE episodes ADD COLUMN manifest TEXT;"
    " ALTER TABLE episodes ADD COLUMN changed_files TEXT;",
}


class State(StrEnum):
    PENDING = "pending"
    PACKING = "packing"
    UPLOADING = "uploading"
    RETRY_WAIT = "retry-wait"
    SHIPPED = "shipped"
    FATAL = "fatal"


WAITING = (State.PENDING, State.RETRY_WAIT)


@dataclass(frozen=True)
class Episode:
    episode_id: str
    source: Path
    kind: Kind
    state: State
    commit: str | None
    packed_path: Path | None
    sha256: str | None
    size_bytes: int | None
    attempts: int
    digest_retries: int
    next_attempt_at: float
    last_error: str | None
    remediation: str | None
    discovered_at: float
    updated_at: float
    shipped_at: float | None
    local_deleted_at: float | None
    manifest: str | None = None  # what the packer saw (shipper.changes), directories only
    changed_files: str | None = None  # set when the directory changed after packing

    @property
    def prepared(self) -> bool:
        """Commit known and tarball hashed: ready for the receiver."""
        return self.commit is not None and self.sha256 is not None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Episode:
        return cls(
            episode_id=row["episode_id"],
            source=Path(row["source"]),
            kind=Kind(row["kind"]),
            state=State(row["state"]),
            commit=row["commit_id"],
            packed_path=None if row["packed_path"] is None else Path(row["packed_path"]),
            sha256=row["sha256"],
            size_bytes=row["size_bytes"],
            attempts=row["attempts"],
            digest_retries=row["digest_retries"],
            next_attempt_at=row["next_attempt_at"],
            last_error=row["last_error"],
            remediation=row["remediation"],
            discovered_at=row["discovered_at"],
            updated_at=row["updated_at"],
            shipped_at=row["shipped_at"],
            local_deleted_at=row["local_deleted_at"],
            manifest=row["manifest"],
            changed_files=row["changed_files"],
        )


@dataclass(frozen=True)
class Refusal:
    commit: str
    reason: str
    remediation: str | None


@dataclass(frozen=True)
class ReceiverState:
    failures: int
    next_try: float
    last_error: str | None


def connect(path: Path, *, create: bool = True) -> sqlite3.Connection:
    """Open the queue database with the durability settings the design relies on."""
    if not create and not path.exists():
        raise FileNotFoundError(path)
    # Any thread: the daemon's queue thread uses a connection opened on the main one;
    # sharing it is serialised by Queue.lock (see shipper.async_queue).
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
    # lost "shipped" would be re-uploaded (harmless) but a lost "fatal" would not.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn
