"""Recent rejections and stale marks in the jsonl catalogue's view file, shared by all workers.

They are not derived from index.jsonl, so a rebuild of the view keeps them (only a view file
that is not a database at all loses them). Bounded as receiver.storage.marks says.
"""

from __future__ import annotations

from receiver.storage.jsonl_view import ViewDatabase
from receiver.storage.marks import (
    KEEP_SECONDS,
    MAX_REJECTIONS,
    MAX_STALE_HOSTS,
    Rejection,
    StaleMark,
    StaleRefusal,
)

_STALE_UPSERT = """
INSERT INTO stale VALUES (:host, :at, :commit, :reason, :behind_by, :episode, 1, NULL)
ON CONFLICT (host) DO UPDATE SET at=excluded.at, commit_id=excluded.commit_id,
    reason=excluded.reason, behind_by=excluded.behind_by, episode=excluded.episode,
    refusals=refusals+1
"""


def record_rejection(db: ViewDatabase, item: Rejection) -> None:
    with db.lock:
        with db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO rejections VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.time,
                    item.method,
                    item.host,
                    item.episode,
                    item.outcome,
                    item.status,
                    item.commit,
                    item.behind_by,
                ),
            )
            newest = cursor.lastrowid or 0
            conn.execute(
                "DELETE FROM rejections WHERE id <= ? OR at < ?",
                (newest - MAX_REJECTIONS, item.time - KEEP_SECONDS),
            )


def recent_rejections(db: ViewDatabase, since: float) -> list[Rejection]:
    with db.lock:
        cursor = db.connection().execute(
            "SELECT at, method, host, episode, outcome, status, commit_id, behind_by"
            " FROM rejections WHERE at >= ? ORDER BY id DESC",
            (since,),
        )
        return [Rejection(*values) for values in cursor]


def record_stale(db: ViewDatabase, refusal: StaleRefusal) -> None:
    with db.lock:
        with db.write() as conn:
            conn.execute(_STALE_UPSERT, refusal.__dict__)
            conn.execute(
                "DELETE FROM stale WHERE at < ? OR host IN (SELECT host FROM stale"
                " ORDER BY at DESC LIMIT -1 OFFSET ?)",
                (refusal.at - KEEP_SECONDS, MAX_STALE_HOSTS),
            )


def record_accepted(db: ViewDatabase, host_id: str, at: float) -> None:
    with db.lock:
        conn = db.connection()
        # Read first: most stored uploads come from hosts with no mark, and a read takes no lock.
        if conn.execute("SELECT 1 FROM stale WHERE host=?", (host_id,)).fetchone() is None:
            return
        conn.execute("UPDATE stale SET accepted_since=? WHERE host=?", (at, host_id))


def stale_marks(db: ViewDatabase, since: float) -> dict[str, StaleMark]:
    with db.lock:
        cursor = db.connection().execute(
            "SELECT host, at, commit_id, reason, behind_by, episode, refusals, accepted_since"
            " FROM stale WHERE at >= ? ORDER BY at",
            (since,),
        )
        return {host: StaleMark(*values) for host, *values in cursor}
