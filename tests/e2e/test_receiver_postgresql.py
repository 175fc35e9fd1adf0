"""A receiver on the PostgreSQL catalogue: the contract's rows, the database going away."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.conftest import StartReceiver
from tests.e2e.test_receiver_protocol import put
from tests.postgres import PostgresServer
from tests.support import PROJECT_ROOT, head_commits, make_tarball


def rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM episodes ORDER BY seq")
        return cur.fetchall()


def test_the_contract_rows_with_the_postgresql_catalogue(
    tmp_path: Path, repo: Path, postgres_dsn: str, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, index={"type": "postgresql", "dsn": postgres_dsn})
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    stored = put(receiver.url, "/episodes/lab-07/ep-1", body, head)
    assert stored.status_code == 201, stored.text
    assert put(receiver.url, "/episodes/lab-07/ep-1", body, head).status_code == 200
    other = put(receiver.url, "/episodes/lab-07/ep-1", make_tarball(head), head)
    assert other.status_code == 409
    assert httpx.head(f"{receiver.url}/episodes/lab-07/ep-1").status_code == 200
    [row] = rows(postgres_dsn)
    assert (row["host_id"], row["episode_id"], row["commit"]) == ("lab-07", "ep-1", head)
    assert row["sha256"] == hashlib.sha256(body).hexdigest() and row["seq"] >= 1
    assert not (tmp_path / "data" / "index.jsonl").exists()
    assert "lab-07" in httpx.get(f"{receiver.url}/").text
    assert httpx.get(f"{receiver.url}/readyz").status_code == 200
    assert httpx.get(f"{receiver.url}/healthz").json()["index_rows"] == 1


def test_database_down_means_503_and_uploads_resume_without_a_restart(
    tmp_path: Path,
    repo: Path,
    postgres_server: PostgresServer,
    postgres_dsn: str,
    start_receiver: StartReceiver,
) -> None:
    index = {"type": "postgresql", "dsn": postgres_dsn, "connect_timeout_seconds": 1.0}
    receiver = start_receiver(repo, index=index)
    head = head_commits(repo, 1)[0]
    bodies = {f"ep-{n}": make_tarball(head) for n in range(30)}
    answers: dict[str, list[int]] = {name: [] for name in bodies}

    def ship(names: list[str]) -> None:
        for name in names:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                response = put(receiver.url, f"/episodes/lab-07/{name}", bodies[name], head)
                answers[name].append(response.status_code)
                if response.status_code in (200, 201):
                    break
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) > 0
                time.sleep(0.2)

    names = list(bodies)
    shippers = [threading.Thread(target=ship, args=(names[i::3],)) for i in range(3)]
    for thread in shippers:
        thread.start()
    time.sleep(0.3)
    postgres_server.stop("immediate")  # a crash of the database, mid-uploads
    down = httpx.get(f"{receiver.url}/readyz")
    time.sleep(1.0)
    postgres_server.start()
    for thread in shippers:
        thread.join()
    assert down.status_code == 503 and "catalogue" in down.json()["detail"]
    assert all(codes[-1] in (200, 201) for codes in answers.values()), answers
    assert any(503 in codes for codes in answers.values())  # the outage was seen
    stored = rows(postgres_dsn)
    assert sorted(r["episode_id"] for r in stored) == sorted(bodies)  # none lost, none twice
    for row in stored:
        assert row["sha256"] == hashlib.sha256(bodies[row["episode_id"]]).hexdigest()
    assert httpx.get(f"{receiver.url}/readyz").status_code == 200
    assert receiver.proc is not None and receiver.proc.poll() is None  # never restarted


def test_check_config_reports_an_unreachable_database_in_one_line(
    tmp_path: Path, repo: Path, postgres_dsn: str
) -> None:
    from tests.support import free_port, receiver_config, write_toml

    config = receiver_config(
        tmp_path,
        repo,
        index={"type": "postgresql", "dsn": f"host=127.0.0.1 port={free_port()} user=x"},
    )
    path = write_toml(tmp_path / "receiver.toml", config)
    command = [sys.executable, "-m", "receiver", "check-config", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "index.dsn" in lines[0] and "unavailable" in lines[0]
    config["index"]["dsn"] = postgres_dsn
    write_toml(path, config)
    fresh = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert fresh.returncode == 2 and "start a receiver once" in fresh.stderr
