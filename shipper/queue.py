"""The durable queue's writes: one SQLite database (WAL, synchronous=FULL) in state_dir.

Every state change is one committed transaction, durable before the call returns, so a
kill -9 or power cut leaves the old or the new state. Rows are never removed: a shipped
id stays known and is not shipped twice. Coroutines go through shipper.async_queue.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from shipper.queue_reads import QueueReads
from shipper.spool import Kind
from shipper.states import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    WAITING,
    ReceiverState,
    State,
    connect,
)


class QueueError(Exception):
    """The state database cannot be used by this version."""


class Queue(QueueReads):
    """All reads and writes of the shipper's state. One process writes (see daemon lock)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(f"queue schema {version} is newer than this shipper's")
        if version < SCHEMA_VERSION:
            # executescript commits any open transaction, so it carries its own.
            migration = MIGRATIONS.get(version, "")
            conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA}; {migration}"
                f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )

    @classmethod
    def open(cls, state_dir: Path) -> Queue:
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(connect(state_dir / "queue.db"))

    def close(self) -> None:
        self.conn.close()

    # --- discovery and recovery -------------------------------------------------

    def recover(self) -> int:
        """After a crash: work that was in progress starts over (uploads begin with HEAD)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE episodes SET state = ?, updated_at = ? WHERE state IN (?, ?)",
                (State.PENDING, time.time(), State.PACKING, State.UPLOADING),
            )
            return cursor.rowcount

    def add(self, episode_id: str, source: Path, kind: Kind, error: str | None = None) -> bool:
        """Register a finished spool entry; False when the id is already known."""
        now = time.time()
        state = State.PENDING if error is None else State.FATAL
        cursor = self.conn.execute(
            "INSERT OR IGNORE INTO episodes (episode_id, source, kind, state, last_error,"
            " discovered_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (episode_id, str(source), kind, state, error, now, now),
        )
        return cursor.rowcount == 1

    def make_due_now(self) -> int:
        """`once` tries everything now, whatever the backoff said."""
        cursor = self.conn.execute(
            "UPDATE episodes SET next_attempt_at = 0 WHERE state = ?", (State.RETRY_WAIT,)
        )
        return cursor.rowcount

    # --- transitions --------------------------------------------------------------

    def start_packing(self, episode_id: str) -> bool:
        return self._update(episode_id, WAITING, state=State.PACKING)

    def set_commit(self, episode_id: str, commit: str) -> bool:
        return self._update(episode_id, (State.PACKING,), commit_id=commit)

    def finish_packing(
        self, episode_id: str, path: Path, sha256: str, size: int, manifest: str | None = None
    ) -> bool:
        return self._update(
            episode_id,
            (State.PACKING,),
            state=State.PENDING,
            packed_path=path,
            sha256=sha256,
            size_bytes=size,
            next_attempt_at=0.0,
            manifest=manifest,
            changed_files=None,
        )

    def mark_changed(self, episode_id: str, files: str) -> bool:
        """The directory changed after packing: retention keeps it, `status` shows it."""
        cursor = self.conn.execute(
            "UPDATE episodes SET changed_files = ?, updated_at = ? WHERE episode_id = ?",
            (files, time.time(), episode_id),
        )
        return cursor.rowcount == 1

    def forget_packed(self, episode_id: str) -> bool:
        """The packed copy is gone or wrong: pack or hash again before uploading."""
        return self._update(
            episode_id, (*WAITING, State.UPLOADING), packed_path=None, sha256=None, size_bytes=None
        )

    def start_upload(self, episode_id: str) -> bool:
        return self._update(episode_id, WAITING, state=State.UPLOADING)

    def abandon(self, episode_id: str) -> bool:
        """Work interrupted by shutdown: back to pending, no attempt counted."""
        return self._update(episode_id, (State.PACKING, State.UPLOADING), state=State.PENDING)

    def shipped(self, episode_id: str) -> bool:
        # From fatal too: a 412 fan-out may have parked an episode whose own
        # upload was already in flight and then succeeded.
        return self._update(
            episode_id,
            (State.UPLOADING, *WAITING, State.FATAL),
            state=State.SHIPPED,
            shipped_at=time.time(),
            last_error=None,
            remediation=None,
            next_attempt_at=0.0,
        )

    def fatal(self, episode_id: str, reason: str, remediation: str | None = None) -> bool:
        return self._update(
            episode_id,
            (State.PACKING, State.UPLOADING, *WAITING),
            state=State.FATAL,
            last_error=reason,
            remediation=remediation,
        )

    def retry_later(self, episode_id: str, reason: str, next_at: float) -> bool:
        episode = self.get(episode_id)
        if episode is None:
            return False
        return self._update(
            episode_id,
            (State.PACKING, State.UPLOADING, *WAITING),
            state=State.RETRY_WAIT,
            attempts=episode.attempts + 1,
            last_error=reason,
            next_attempt_at=next_at,
        )

    def digest_mismatch(self, episode_id: str, reason: str) -> bool:
        """Forget the hash (and our packed copy) so the next try re-hashes the source."""
        episode = self.get(episode_id)
        if episode is None:
            return False
        return self._update(
            episode_id,
            (State.UPLOADING, *WAITING),
            state=State.PENDING,
            digest_retries=episode.digest_retries + 1,
            last_error=reason,
            packed_path=None,
            sha256=None,
            size_bytes=None,
            next_attempt_at=0.0,
        )

    # --- refused commits ------------------------------------------------------------

    def refuse_commit(
        self, commit: str, reason: str, remediation: str | None
    ) -> tuple[bool, list[str]]:
        """Record a 412 and park every waiting episode of that commit.

        Returns whether the refusal is new (so it is logged once) and the ids parked.
        """
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO refused_commits (commit_id, reason, remediation, refused_at)"
                " VALUES (?, ?, ?, ?)",
                (commit, reason, remediation, now),
            )
            new = cursor.rowcount == 1
            parked = [
                row[0]
                for row in conn.execute(
                    "SELECT episode_id FROM episodes WHERE commit_id = ? AND state IN (?, ?)",
                    (commit, *WAITING),
                )
            ]
            conn.execute(
                "UPDATE episodes SET state = ?, last_error = ?, remediation = ?, updated_at = ?"
                " WHERE commit_id = ? AND state IN (?, ?)",
                (State.FATAL, reason, remediation, now, commit, *WAITING),
            )
        return new, parked

    def retry_fatal(self, ids: Sequence[str] = (), commit: str | None = None) -> list[str]:
        """Re-queue fatal episodes (the operator fixed their cause); returns their ids.

        With no ids and no commit: every fatal episode, and every refused commit is
        forgotten. Otherwise only the named ones and those of `commit`, and only
        their commits' refusals (a refusal would park them again at once).
        """
        marks = ", ".join("?" for _ in ids)
        where = "state = ?"
        params: list[object] = [State.FATAL]
        if ids or commit is not None:
            where += f" AND (episode_id IN ({marks or 'NULL'}) OR commit_id = ?)"
            params += [*ids, commit]
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT episode_id, commit_id FROM episodes WHERE {where}", params
            ).fetchall()
            conn.execute(
                "UPDATE episodes SET state = ?, attempts = 0, digest_retries = 0,"
                " last_error = NULL, remediation = NULL, next_attempt_at = 0, updated_at = ?"
                f" WHERE {where}",
                [State.PENDING, time.time(), *params],
            )
            if ids or commit is not None:
                commits = {commit, *(row[1] for row in rows)} - {None}
                conn.executemany(
                    "DELETE FROM refused_commits WHERE commit_id = ?", [(c,) for c in commits]
                )
            else:
                conn.execute("DELETE FROM refused_commits")
        return [row[0] for row in rows]

    # --- reporting and retention ------------------------------------------------------

    def local_deleted(self, episode_id: str) -> bool:
        return self._update(episode_id, (State.SHIPPED,), local_deleted_at=time.time())

    def packed_copy_removed(self, episode_id: str) -> bool:
        """Our packed copy of a directory was deleted; the directory is still the source.

        A shipped episode keeps its sha256 (what the receiver holds); a fatal one
        forgets it, so that `retry` packs the (perhaps fixed) directory again.
        """
        cursor = self.conn.execute(
            "UPDATE episodes SET packed_path = NULL,"
            " sha256 = CASE WHEN state = ? THEN NULL ELSE sha256 END,"
            " size_bytes = CASE WHEN state = ? THEN NULL ELSE size_bytes END, updated_at = ?"
            " WHERE episode_id = ? AND kind = ? AND state IN (?, ?)",
            (
                State.FATAL,
                State.FATAL,
                time.time(),
                episode_id,
                Kind.DIRECTORY,
                State.SHIPPED,
                State.FATAL,
            ),
        )
        return cursor.rowcount == 1

    def save_receiver(self, state: ReceiverState) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO receiver (id, failures, next_try, last_error, updated_at)"
            " VALUES (1, ?, ?, ?, ?)",
            (state.failures, state.next_try, state.last_error, time.time()),
        )
