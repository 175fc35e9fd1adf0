"""The PostgreSQL catalogue: one table that every receiver of a fleet shares.

`UNIQUE (host_id, episode_id)` makes the insert the exactly-once arbiter (`INSERT ... ON
CONFLICT DO NOTHING RETURNING`); export reads rows in (txid, seq) order up to the oldest
transaction still open, so it never passes a row that commits later. Claims are
session advisory locks on one connection per process, so a receiver that dies releases
them with its session. The server down is BackendUnavailable (503), and the pool
reconnects by itself when it is back.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from receiver.config import PostgresIndexConfig
from receiver.storage.base import BackendUnavailable, CatalogueState
from receiver.storage.marks import CommitSummary, Rejection, StaleMark, StaleRefusal
from receiver.storage.postgresql_marks import PostgresMarks
from receiver.storage.postgresql_schema import migrate
from receiver.storage.rows import SCHEMA_VERSION, HostSummary, IndexRow

log = logging.getLogger(__name__)

_COLUMNS = "host_id, episode_id, sha256, size_bytes, commit, received_at_wall, backfilled"
_RETRY_AFTER = 5


def read_dsn(config: PostgresIndexConfig) -> str:
    """The DSN: the key itself, or the private file that holds it (with its password)."""
    if config.dsn_file is None:
        return config.dsn
    mode = config.dsn_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{config.dsn_file} is readable by others; chmod 600 it")
    return config.dsn_file.read_text().strip()


def _down(error: Exception) -> BackendUnavailable:
    """psycopg's reason, its first line only: it goes into one log line and one JSON field."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return BackendUnavailable(f"the catalogue database is unavailable: {first}", _RETRY_AFTER)


def _row(record: dict[str, Any]) -> IndexRow:
    return IndexRow(
        backfilled=bool(record["backfilled"]),
        commit=record["commit"],
        episode_id=record["episode_id"],
        host_id=record["host_id"],
        received_at_wall=record["received_at_wall"],
        schema_version=SCHEMA_VERSION,
        sha256=record["sha256"],
        size_bytes=int(record["size_bytes"]),
    )


def _lock_key(host_id: str, episode_id: str) -> int:
    digest = hashlib.sha256(f"{host_id}/{episode_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)  # pg advisory keys are bigint


class PostgresCatalogue:
    def __init__(self, config: PostgresIndexConfig) -> None:
        self._config = config
        self._table = sql.Identifier(config.table)
        self._pool: ConnectionPool | None = None
        self._claims_conn: psycopg.Connection[Any] | None = None
        self._claims_lock = threading.Lock()
        self._held: set[tuple[str, str]] = set()
        self._marks = PostgresMarks(self._query, config.table)

    # -- connections -----------------------------------------------------------------

    def _open_pool(self) -> ConnectionPool:
        if self._pool is None:
            kwargs = {"connect_timeout": max(1, round(self._config.connect_timeout_seconds))}
            self._pool = ConnectionPool(
                read_dsn(self._config),
                min_size=1,
                max_size=self._config.pool_size,
                kwargs=kwargs | {"autocommit": True},
                timeout=self._config.connect_timeout_seconds,
                open=False,
                name="catalogue",
            )
            self._pool.open(wait=False)
        return self._pool

    def _query(self, query: sql.Composed, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            with self._open_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description is not None else []
        except (psycopg.OperationalError, PoolTimeout) as error:
            raise _down(error) from error

    def _sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(table=self._table)

    # -- the Catalogue interface -------------------------------------------------------

    def recover(self, *, repair: bool = True) -> CatalogueState:
        """Create or upgrade the schema (repair=False: only check that it is current)."""
        with self._connect() as conn:
            try:
                migrate(conn, self._config.table, create=repair)
            except psycopg.OperationalError as error:
                raise _down(error) from error
        return CatalogueState(rows=self.count())

    def open(self) -> None:
        self._open_pool()

    def close(self) -> None:
        with self._claims_lock:
            if self._claims_conn is not None:
                self._claims_conn.close()  # the session's advisory locks go with it
                self._claims_conn = None
            self._held.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def lookup(self, host_id: str, episode_id: str) -> IndexRow | None:
        query = self._sql(
            f"SELECT {_COLUMNS} FROM {{table}} WHERE host_id = %s AND episode_id = %s"
        )
        found = self._query(query, (host_id, episode_id))
        return _row(found[0]) if found else None

    def append_if_absent(self, row: IndexRow) -> tuple[IndexRow, bool]:
        insert = self._sql(
            f"INSERT INTO {{table}} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            f"ON CONFLICT (host_id, episode_id) DO NOTHING RETURNING seq"
        )
        values = (
            row.host_id, row.episode_id, row.sha256, row.size_bytes, row.commit,
            row.received_at_wall, row.backfilled,
        )  # fmt: skip
        if self._query(insert, values):
            return row, True
        existing = self.lookup(row.host_id, row.episode_id)
        assert existing is not None  # the conflict was with it, and rows are never deleted
        return existing, False

    def claim(self, host_id: str, episode_id: str) -> bool:
        key = (host_id, episode_id)
        with self._claims_lock:
            if key in self._held:
                return False  # advisory locks are reentrant within a session: not for us
            conn = self._claims_connection()
            try:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_lock_key(*key),))
                taken = bool(got.fetchone()[0])  # type: ignore[index]
            except psycopg.OperationalError as error:
                self._claims_conn = None
                self._held.clear()  # the session, and with it every lock, is gone
                raise _down(error) from error
            if taken:
                self._held.add(key)
            return taken

    def release(self, host_id: str, episode_id: str) -> None:
        key = (host_id, episode_id)
        with self._claims_lock:
            if key not in self._held:
                return
            self._held.discard(key)
            if self._claims_conn is None:
                return
            try:
                self._claims_conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_key(*key),))
            except psycopg.OperationalError:
                self._claims_conn = None  # the session ended: its locks ended with it
                self._held.clear()

    def _claims_connection(self) -> psycopg.Connection[Any]:
        if self._claims_conn is None or self._claims_conn.closed:
            self._claims_conn = self._connect()
            self._held.clear()
        return self._claims_conn

    def _connect(self) -> psycopg.Connection[Any]:
        """A connection of our own, outside the pool (schema changes, the claims session)."""
        try:
            return psycopg.connect(
                read_dsn(self._config),
                autocommit=True,
                connect_timeout=max(1, round(self._config.connect_timeout_seconds)),
            )
        except psycopg.OperationalError as error:
            raise _down(error) from error

    def commit_summaries(self) -> dict[str | None, CommitSummary]:
        query = self._sql(
            "SELECT commit, count(*) AS episodes, sum(size_bytes) AS bytes FROM {table}"
            " GROUP BY commit"
        )
        return {
            record["commit"]: CommitSummary(int(record["episodes"]), int(record["bytes"]))
            for record in self._query(query)
        }

    def record_rejection(self, rejection: Rejection) -> None:
        self._marks.record_rejection(rejection)

    def recent_rejections(self, since: float) -> list[Rejection]:
        return self._marks.recent_rejections(since)

    def record_stale(self, refusal: StaleRefusal) -> None:
        self._marks.record_stale(refusal)

    def record_accepted(self, host_id: str, at: float) -> None:
        self._marks.record_accepted(host_id, at)

    def stale_marks(self, since: float) -> dict[str, StaleMark]:
        return self._marks.stale_marks(since)

    def unready_reason(self) -> str | None:
        try:
            self._query(sql.Composed([sql.SQL("SELECT 1")]))
        except BackendUnavailable as error:
            return f"catalogue: {error}"
        return None

    def count(self) -> int:
        return int(self._query(self._sql("SELECT count(*) AS n FROM {table}"))[0]["n"])

    def iter_rows(self) -> Iterator[IndexRow]:
        return self.rows_after(None)

    def host_summaries(self) -> dict[str, HostSummary]:
        query = self._sql(
            "SELECT host_id, count(*) AS episodes, sum(size_bytes) AS bytes, "
            "max(received_at_wall) AS last_seen, "
            "(array_agg(commit ORDER BY received_at_wall DESC, seq DESC))[1] AS last_commit "
            "FROM {table} GROUP BY host_id"
        )
        return {
            record["host_id"]: HostSummary(
                episodes=int(record["episodes"]),
                bytes=int(record["bytes"]),
                last_seen=record["last_seen"],
                last_commit=record["last_commit"],
            )
            for record in self._query(query)
        }

    def rows_after(self, key: tuple[str, str] | None) -> Iterator[IndexRow]:
        """In (txid, seq) order: a sequence hands out seq at insert, not at commit, so seq
        alone could pass a row that a slower transaction commits a moment later. Rows of
        transactions older than the oldest one still open are final, and every later row
        sorts after them: stopping there, an export never skips one."""
        after = ("0", 0)
        if key is not None:
            query = self._sql(
                "SELECT txid::text, seq FROM {table} WHERE host_id = %s AND episode_id = %s"
            )
            found = self._query(query, key)
            if not found:
                raise KeyError(key)
            after = (found[0]["txid"], int(found[0]["seq"]))
        return self._rows_from(after)

    def _rows_from(self, after: tuple[str, int], page: int = 10_000) -> Iterator[IndexRow]:
        query = self._sql(
            f"SELECT txid::text, seq, {_COLUMNS} FROM {{table}} "
            "WHERE (txid, seq) > (%s::xid8, %s) "
            "AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY txid, seq LIMIT %s"
        )
        while True:
            records = self._query(query, (*after, page))
            for record in records:
                yield _row(record)
            if len(records) < page:
                return
            after = (records[-1]["txid"], int(records[-1]["seq"]))
