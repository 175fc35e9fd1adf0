"""The queue's reads (what the loop, `status` and retention ask) and its SQL primitives.

Queue (shipper.queue) adds the writes. Not thread-safe by itself: whoever shares one
connection between threads holds `lock` (shipper.async_queue does, for the daemon).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path

from shipper.spool import Kind
from shipper.states import WAITING, Episode, ReceiverState, Refusal, State


class QueueReads:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Reentrant: a caller holding it may call any method, which may take it again.
        self.lock = threading.RLock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _update(self, episode_id: str, expect: tuple[State, ...], **fields: object) -> bool:
        """Set fields on one episode if it is in one of the expected states."""
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        marks = ", ".join("?" for _ in expect)
        cursor = self.conn.execute(
            f"UPDATE episodes SET {assignments} WHERE episode_id = ? AND state IN ({marks})",
            [*(str(v) if isinstance(v, Path) else v for v in fields.values()), episode_id, *expect],
        )
        return cursor.rowcount == 1

    def known_sources(self) -> dict[str, Path]:
        """Every episode id ever queued, with the spool entry it came from."""
        rows = self.conn.execute("SELECT episode_id, source FROM episodes")
        return {episode_id: Path(source) for episode_id, source in rows}

    def get(self, episode_id: str) -> Episode | None:
        row = self.conn.execute(
            "SELECT * FROM episodes WHERE episode_id = ?", (episode_id,)
        ).fetchone()
        return None if row is None else Episode.from_row(row)

    # --- what to do next --------------------------------------------------------

    def _next(self, now: float, prepared: bool, exclude: AbstractSet[str]) -> Episode | None:
        condition = (
            "commit_id IS NOT NULL AND sha256 IS NOT NULL"
            if prepared
            else "(commit_id IS NULL OR sha256 IS NULL)"
        )
        for row in self.conn.execute(
            f"SELECT * FROM episodes WHERE state IN (?, ?) AND next_attempt_at <= ?"
            f" AND {condition} ORDER BY discovered_at, episode_id",
            (*WAITING, now),
        ):
            if row["episode_id"] not in exclude:
                return Episode.from_row(row)
        return None

    def next_to_prepare(
        self, now: float, exclude: AbstractSet[str] = frozenset()
    ) -> Episode | None:
        """Oldest due episode whose commit or tarball is not known yet."""
        return self._next(now, prepared=False, exclude=exclude)

    def next_to_upload(self, now: float, exclude: AbstractSet[str] = frozenset()) -> Episode | None:
        """Oldest due episode that is packed and hashed."""
        return self._next(now, prepared=True, exclude=exclude)

    def packed_backlog(self) -> int:
        """Packed copies made by us that still wait to be shipped (they cost disk space)."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM episodes WHERE kind = ? AND sha256 IS NOT NULL"
            " AND state IN (?, ?, ?)",
            (Kind.DIRECTORY, *WAITING, State.UPLOADING),
        ).fetchone()
        return int(row[0])

    def next_due_at(self) -> float | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM episodes WHERE state = ?", (State.RETRY_WAIT,)
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def changed_episodes(self) -> list[Episode]:
        rows = self.conn.execute(
            "SELECT * FROM episodes WHERE changed_files IS NOT NULL ORDER BY episode_id"
        )
        return [Episode.from_row(row) for row in rows]

    def refusal(self, commit: str) -> Refusal | None:
        row = self.conn.execute(
            "SELECT * FROM refused_commits WHERE commit_id = ?", (commit,)
        ).fetchone()
        return None if row is None else Refusal(row["commit_id"], row["reason"], row["remediation"])

    def refusals(self) -> list[Refusal]:
        rows = self.conn.execute("SELECT * FROM refused_commits ORDER BY refused_at")
        return [Refusal(row["commit_id"], row["reason"], row["remediation"]) for row in rows]

    def counts(self) -> dict[State, int]:
        counts = dict.fromkeys(State, 0)
        for state, count in self.conn.execute(
            "SELECT state, COUNT(*) FROM episodes GROUP BY state"
        ):
            counts[State(state)] = count
        return counts

    def unshipped(self) -> list[Episode]:
        rows = self.conn.execute(
            "SELECT * FROM episodes WHERE state != ? ORDER BY discovered_at, episode_id",
            (State.SHIPPED,),
        )
        return [Episode.from_row(row) for row in rows]

    def due_for_deletion(self, shipped_before: float) -> list[Episode]:
        rows = self.conn.execute(
            "SELECT * FROM episodes WHERE state = ? AND local_deleted_at IS NULL"
            " AND changed_files IS NULL AND shipped_at <= ? ORDER BY shipped_at",
            (State.SHIPPED, shipped_before),
        )
        return [Episode.from_row(row) for row in rows]

    def packed_copies(self) -> list[Episode]:
        """Directory episodes that point at a packed copy of ours, in any state."""
        rows = self.conn.execute(
            "SELECT * FROM episodes WHERE kind = ? AND packed_path IS NOT NULL", (Kind.DIRECTORY,)
        )
        return [Episode.from_row(row) for row in rows]

    def receiver(self) -> ReceiverState | None:
        row = self.conn.execute("SELECT * FROM receiver WHERE id = 1").fetchone()
        if row is None:
            return None
        return ReceiverState(row["failures"], row["next_try"], row["last_error"])
