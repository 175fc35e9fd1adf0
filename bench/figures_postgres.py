"""The PostgreSQL catalogue: small uploads against the jsonl catalogue, and the insert rate."""

from __future__ import annotations

import time

from bench.figures_ops import put_load
from bench.receivers import Bench, in_threads, receiver
from bench.report import Figure, Target, at_least
from bench.workload import write_episode_tarball
from receiver.config import PostgresIndexConfig
from receiver.storage import new_row
from receiver.storage.postgresql import PostgresCatalogue
from tests.postgres import PostgresServer, start_postgres

INSERT_THREADS = 16


def _server(figures: list[Figure]) -> PostgresServer | None:
    try:
        return start_postgres()
    except (RuntimeError, OSError) as error:
        for figure in figures:
            figure.unavailable = f"PostgreSQL cannot run here ({error})"
        return None


def postgres(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    count, clients = sizes.small_uploads, sizes.small_clients
    small = Figure(
        "pg-small",
        f"{count} uploads of {sizes.small_kib} KiB, {clients} clients, PostgreSQL catalogue",
        "req/s",
        "receiver on postgresql",
        "receiver on jsonl",
        at_least(0.8),
    )
    rows = Figure(
        "pg-rows",
        f"catalogue rows per second, {INSERT_THREADS} threads, the receiver's insert",
        "rows/s",
        "append_if_absent (commit-order lock)",
        "plain INSERT ... ON CONFLICT",
        Target("reported (the fleet's ceiling for new episodes)", lambda f: True),
    )
    server = _server([small, rows])
    if server is None:
        return [small, rows]
    try:
        _small_uploads(bench, server, small)
        _insert_rate(bench, server, rows)
    finally:
        server.destroy()
    return [small, rows]


def _small_uploads(bench: Bench, server: PostgresServer, figure: Figure) -> None:
    sizes = bench.sizes
    home = bench.fresh_dir("pg-small")
    src = home / "small.tar.zst"
    write_episode_tarball(bench.pool, src, bench.commit, sizes.small_kib * 1024)
    body = src.read_bytes()
    index = {"type": "postgresql", "dsn": server.create_database("bench_small"), "pool_size": 20}
    with (
        receiver(bench, "pg-small/postgresql", index=index) as on_pg,
        receiver(bench, "pg-small/jsonl") as on_jsonl,
    ):
        for run in range(sizes.runs):  # alternated, so both see the same disk and load
            pg_rate = _rate(on_pg.port, sizes.small_uploads, sizes.small_clients, run, body, bench)
            jsonl_rate = _rate(
                on_jsonl.port, sizes.small_uploads, sizes.small_clients, run, body, bench
            )
            figure.add(pg_rate, jsonl_rate)


def _rate(port: int, count: int, clients: int, run: int, body: bytes, bench: Bench) -> float:
    started = time.perf_counter()
    put_load(port, count, clients, f"r{run}", body, bench.commit)
    return count / (time.perf_counter() - started)


def _insert_rate(bench: Bench, server: PostgresServer, figure: Figure) -> None:
    count = bench.sizes.small_uploads * 5
    for run in range(bench.sizes.runs):
        dsn = server.create_database(f"bench_rows_{run}")
        catalogue = PostgresCatalogue(PostgresIndexConfig(dsn=dsn, pool_size=INSERT_THREADS))
        catalogue.recover()
        try:
            figure.add(_timed_inserts(catalogue, count), _plain_rate(dsn, count))
        finally:
            catalogue.close()
    figure.notes.append(f"{count} rows a run; one local PostgreSQL, fsync on, on this disk")


def _timed_inserts(catalogue: PostgresCatalogue, count: int) -> float:
    started = time.perf_counter()

    def insert(number: int) -> None:
        for item in range(number, count, INSERT_THREADS):
            catalogue.append_if_absent(new_row(f"h{number}", f"e{item}", "a" * 64, 1, "c" * 40))

    in_threads(insert, INSERT_THREADS)
    return count / (time.perf_counter() - started)


def _plain_rate(dsn: str, count: int) -> float:
    """The same rows, the same threads, without the lock that orders seq by commit."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE plain (LIKE episodes INCLUDING ALL)")
    started = time.perf_counter()

    def insert(number: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for item in range(number, count, INSERT_THREADS):
                conn.execute(
                    "INSERT INTO plain (host_id, episode_id, sha256, size_bytes, commit, "
                    "received_at_wall) VALUES (%s, %s, %s, 1, %s, 'now') ON CONFLICT DO NOTHING",
                    (f"h{number}", f"e{item}", "a" * 64, "c" * 40),
                )

    in_threads(insert, INSERT_THREADS)
    return count / (time.perf_counter() - started)
