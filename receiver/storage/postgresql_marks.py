"""Recent rejections and stale marks in the PostgreSQL catalogue: the whole fleet's, shared.

Bounded as receiver.storage.marks says; each write prunes what fell out of the bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import sql

from receiver.storage.marks import (
    KEEP_SECONDS,
    MAX_REJECTIONS,
    MAX_STALE_HOSTS,
    Rejection,
    StaleMark,
    StaleRefusal,
)

Query = Callable[[sql.Composed, tuple[Any, ...]], list[dict[str, Any]]]


class PostgresMarks:
    def __init__(self, query: Query, table: str) -> None:
        self._query = query
        self._rejections = sql.Identifier(f"{table}_rejections")
        self._stale = sql.Identifier(f"{table}_stale")

    def _sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(rejections=self._rejections, stale=self._stale)

    def record_rejection(self, item: Rejection) -> None:
        self._query(
            self._sql(
                "WITH added AS (INSERT INTO {rejections} (at, method, host, episode, outcome,"
                " status, commit, behind_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id)"
                " DELETE FROM {rejections} WHERE at < %s OR id <= (SELECT id FROM added) - %s"
            ),
            (
                item.time, item.method, item.host, item.episode, item.outcome, item.status,
                item.commit, item.behind_by, item.time - KEEP_SECONDS, MAX_REJECTIONS,
            ),
        )  # fmt: skip

    def recent_rejections(self, since: float) -> list[Rejection]:
        records = self._query(
            self._sql(
                "SELECT at, method, host, episode, outcome, status, commit, behind_by"
                " FROM {rejections} WHERE at >= %s ORDER BY id DESC LIMIT %s"
            ),
            (since, MAX_REJECTIONS),
        )
        return [Rejection(*record.values()) for record in records]

    def record_stale(self, refusal: StaleRefusal) -> None:
        self._query(
            self._sql(
                "INSERT INTO {stale} VALUES (%s, %s, %s, %s, %s, %s, 1, NULL)"
                " ON CONFLICT (host) DO UPDATE SET at = excluded.at, commit = excluded.commit,"
                " reason = excluded.reason, behind_by = excluded.behind_by,"
                " episode = excluded.episode, refusals = {stale}.refusals + 1"
            ),
            (
                refusal.host, refusal.at, refusal.commit, refusal.reason, refusal.behind_by,
                refusal.episode,
            ),
        )  # fmt: skip
        self._query(
            self._sql(
                "DELETE FROM {stale} WHERE at < %s OR host IN"
                " (SELECT host FROM {stale} ORDER BY at DESC OFFSET %s)"
            ),
            (refusal.at - KEEP_SECONDS, MAX_STALE_HOSTS),
        )

    def record_accepted(self, host_id: str, at: float) -> None:
        self._query(
            self._sql("UPDATE {stale} SET accepted_since = %s WHERE host = %s"), (at, host_id)
        )

    def stale_marks(self, since: float) -> dict[str, StaleMark]:
        records = self._query(
            self._sql(
                "SELECT host, at, commit, reason, behind_by, episode, refusals, accepted_since"
                " FROM {stale} WHERE at >= %s ORDER BY at"
            ),
            (since,),
        )
        return {host: StaleMark(*values) for host, *values in (r.values() for r in records)}
