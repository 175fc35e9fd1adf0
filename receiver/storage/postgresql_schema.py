"""The PostgreSQL catalogue's schema, created and upgraded at start, one version at a time.

Receivers that start together serialize on an advisory lock; the version table says what
is there, so an upgrade runs once. check-config asks without changing anything.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from receiver.storage.base import CatalogueCorrupt

VERSION_TABLE = "episode_ingest_schema"
_MIGRATION_LOCK = 0x6570_6973_6F64_6531  # "episode1": any constant shared by receivers

# Each entry upgrades from the version before it; {table} is the configured table name.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE {table} (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        host_id text NOT NULL,
        episode_id text NOT NULL,
        sha256 text NOT NULL,
        size_bytes bigint NOT NULL,
        commit text,
        received_at_wall text NOT NULL,
        backfilled boolean NOT NULL DEFAULT false,
        -- The inserting transaction: export orders by it and stops at the oldest one still
        -- open, so a row whose transaction commits late is never passed (see postgresql.py).
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        UNIQUE (host_id, episode_id)
    );
    CREATE INDEX ON {table} (txid, seq)
    """,
    # Version 2: recent rejections and stale marks, so every receiver's page shows the fleet.
    """
    CREATE TABLE {rejections} (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at double precision NOT NULL, method text NOT NULL, host text NOT NULL,
        episode text NOT NULL, outcome text NOT NULL, status int NOT NULL,
        commit text, behind_by int
    );
    CREATE INDEX ON {rejections} (at);
    CREATE TABLE {stale} (
        host text PRIMARY KEY, at double precision NOT NULL, commit text, reason text NOT NULL,
        behind_by int, episode text NOT NULL, refusals int NOT NULL,
        accepted_since double precision
    );
    CREATE INDEX ON {stale} (at)
    """,
]
CURRENT = len(MIGRATIONS)


def _version(conn: psycopg.Connection[Any], table: str) -> int:
    found = conn.execute(
        sql.SQL("SELECT version FROM {} WHERE name = %s").format(sql.Identifier(VERSION_TABLE)),
        (table,),
    ).fetchone()
    return int(found[0]) if found else 0


def migrate(conn: psycopg.Connection[Any], table: str, *, create: bool) -> int:
    """Bring `table` to the current version (create=False: only check); returns it."""
    versions = sql.Identifier(VERSION_TABLE)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = conn.execute("SELECT to_regclass(%s)", (VERSION_TABLE,)).fetchone()
        if exists is None or exists[0] is None:
            if not create:
                raise CatalogueCorrupt(
                    f"the database has no {VERSION_TABLE} table: start a receiver once to create it"
                )
            conn.execute(
                sql.SQL("CREATE TABLE {} (name text PRIMARY KEY, version int NOT NULL)").format(
                    versions
                )
            )
        version = _version(conn, table)
        if version > CURRENT:
            raise CatalogueCorrupt(
                f"table {table} is at schema version {version}, newer than this receiver's "
                f"{CURRENT}: upgrade the receiver"
            )
        if version < CURRENT and not create:
            raise CatalogueCorrupt(
                f"table {table} is at schema version {version}, this receiver needs {CURRENT}: "
                "start a receiver once to upgrade it"
            )
        names = {
            "table": sql.Identifier(table),
            "rejections": sql.Identifier(f"{table}_rejections"),
            "stale": sql.Identifier(f"{table}_stale"),
        }
        for step in MIGRATIONS[version:]:
            conn.execute(sql.SQL(step).format(**names))
        if version < CURRENT:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (name, version) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET version = excluded.version"
                ).format(versions),
                (table, CURRENT),
            )
    return CURRENT
