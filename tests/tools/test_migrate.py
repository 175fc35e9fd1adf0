"""episode-index migrate: a jsonl + filesystem store moved onto PostgreSQL, rows as they were."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tests.conftest import StartReceiver
from tests.seaweed import SeaweedServer
from tests.storage.s3_support import objects, read_object, unfinished_uploads
from tests.support import PROJECT_ROOT, ReceiverProcess, receiver_config, write_toml
from tests.tools.conftest import Store
from tests.tools.test_export import config_for


def migrate(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tools.index_export", "migrate"]
    return subprocess.run(
        [*command, "--from", str(source), "--config", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
    )


def target_config(tmp_path: Path, dsn: str) -> Path:
    config = receiver_config(tmp_path / "new", None, index={"type": "postgresql", "dsn": dsn})
    return write_toml(tmp_path / "new.toml", config)


def pg_rows(dsn: str) -> list[dict[str, object]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM episodes ORDER BY seq")
        return cur.fetchall()


def test_every_blob_and_row_moves_and_a_second_run_copies_nothing(
    store: Store, tmp_path: Path, postgres_dsn: str
) -> None:
    source, target = config_for(store, tmp_path), target_config(tmp_path, postgres_dsn)
    first = migrate(source, target)
    assert first.returncode == 0, first.stderr
    assert f"{len(store.bodies)} blobs copied" in first.stdout
    moved = pg_rows(postgres_dsn)
    fields = ("host_id", "episode_id", "sha256", "size_bytes", "commit", "received_at_wall")
    for old, new in zip(store.rows(), moved, strict=True):  # same order, same rows
        assert {key: new[key] for key in fields} == {key: old[key] for key in fields}
    for (host, episode), body in store.bodies.items():
        copy = tmp_path / "new" / "data" / "episodes" / host / f"{episode}.tar.zst"
        assert copy.read_bytes() == body
    again = migrate(source, target)
    assert again.returncode == 0 and "0 blobs copied" in again.stdout
    assert f"{len(store.bodies)} already there" in again.stdout
    assert len(pg_rows(postgres_dsn)) == len(store.bodies)


def test_a_damaged_source_blob_stops_the_migration_without_its_row(
    store: Store, tmp_path: Path, postgres_dsn: str
) -> None:
    source, target = config_for(store, tmp_path), target_config(tmp_path, postgres_dsn)
    damaged = store.rows()[2]
    path = store.tarball(str(damaged["host_id"]), str(damaged["episode_id"]))
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    result = migrate(source, target)
    assert result.returncode == 1 and "does not match its row" in result.stderr
    migrated = [(r["host_id"], r["episode_id"]) for r in pg_rows(postgres_dsn)]
    assert migrated == [(r["host_id"], r["episode_id"]) for r in store.rows()[:2]]
    new_tmp = tmp_path / "new" / "data" / "tmp"
    assert not any(p.is_file() for p in new_tmp.rglob("*"))  # the aborted copy left nothing


def test_a_receiver_on_the_new_backends_serves_what_was_migrated(
    store: Store, tmp_path: Path, postgres_dsn: str, start_receiver: StartReceiver
) -> None:
    source, target = config_for(store, tmp_path), target_config(tmp_path, postgres_dsn)
    assert migrate(source, target).returncode == 0
    receiver = ReceiverProcess(target).start()
    try:
        for host, episode in store.bodies:
            head = httpx.head(f"{receiver.url}/episodes/{host}/{episode}")
            assert head.status_code == 200
        assert json.loads(httpx.get(f"{receiver.url}/healthz").text)["index_rows"] == len(
            store.bodies
        )
    finally:
        receiver.stop()


def test_export_from_postgresql_gives_back_the_original_index_byte_for_byte(
    store: Store, tmp_path: Path, postgres_dsn: str
) -> None:
    from tests.tools.test_export import export

    source, target = config_for(store, tmp_path), target_config(tmp_path, postgres_dsn)
    assert migrate(source, target).returncode == 0
    out = tmp_path / "exported.jsonl"
    lines = store.index.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]))  # an export that stopped half-way
    result = export(target, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == store.index.read_bytes()


def test_a_jsonl_and_filesystem_store_moves_onto_postgresql_and_s3(
    store: Store,
    tmp_path: Path,
    postgres_dsn: str,
    seaweedfs: SeaweedServer,
    s3_storage: dict[str, Any],
) -> None:
    source = config_for(store, tmp_path)
    config = receiver_config(
        tmp_path / "new",
        None,
        index={"type": "postgresql", "dsn": postgres_dsn},
        storage={**s3_storage, "data_dir": str(tmp_path / "new" / "data")},
    )
    config["storage"].pop("min_free_bytes", None)
    target = write_toml(tmp_path / "new.toml", config)
    first = migrate(source, target)
    assert first.returncode == 0, first.stderr
    stored = objects(seaweedfs, s3_storage["bucket"])
    for (host, episode), body in store.bodies.items():
        key = f"episodes/{host}/{episode}.tar.zst"
        assert read_object(seaweedfs, s3_storage["bucket"], key) == body
        assert stored[key]["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert sorted(stored) == sorted(f"episodes/{h}/{e}.tar.zst" for h, e in store.bodies)
    assert unfinished_uploads(seaweedfs, s3_storage["bucket"]) == []
    assert len(pg_rows(postgres_dsn)) == len(store.bodies)
    assert "0 blobs copied" in migrate(source, target).stdout
