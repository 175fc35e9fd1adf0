"""Several receivers behind nginx: one PostgreSQL catalogue, one S3 bucket, one upstream repo.

Every server is real and on loopback: PostgreSQL (a throwaway cluster), SeaweedFS, nginx
with the shipped config, and two receivers, each with its own data dir and its own clone
of one bare upstream repository that its gate fetches.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.nginx import Nginx, start_nginx
from tests.seaweed import SeaweedServer
from tests.shipper.conftest import write_episode
from tests.shipper.processes import shipper_cli, shipper_config
from tests.storage.s3_support import objects, unfinished_uploads
from tests.support import (
    PROJECT_ROOT,
    ReceiverProcess,
    add_commit,
    git,
    head_commits,
    make_repo,
    make_tarball,
    receiver_config,
    write_toml,
)
from tests.tools.test_export import export

PREFIX = "episodes/"


@dataclass
class Fleet:
    receivers: list[ReceiverProcess]
    nginx: Nginx
    dsn: str
    bucket: str
    seaweed: SeaweedServer
    maintainer: Path  # pushes to the upstream
    commit: str

    def rows(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM episodes ORDER BY seq")
            return cur.fetchall()

    def episode_objects(self) -> dict[str, dict[str, Any]]:
        found = objects(self.seaweed, self.bucket)
        return {key: head for key, head in found.items() if key.endswith(".tar.zst")}

    def helpers(self) -> list[str]:
        return [key for key in objects(self.seaweed, self.bucket) if not key.endswith(".tar.zst")]

    @property
    def urls(self) -> list[str]:
        return [self.nginx.url, *(receiver.url for receiver in self.receivers)]


@pytest.fixture
def fleet(
    tmp_path: Path, postgres_dsn: str, seaweedfs: SeaweedServer, s3_storage: dict[str, Any]
) -> Iterator[Fleet]:
    maintainer = tmp_path / "maintainer"
    make_repo(maintainer, commits=3)
    upstream = tmp_path / "upstream.git"
    git(tmp_path, "clone", "-q", "--bare", str(maintainer), str(upstream))
    git(maintainer, "remote", "add", "origin", str(upstream))
    receivers = []
    for number in range(2):
        home = tmp_path / f"receiver-{number}"
        clone = home / "lab-code"
        home.mkdir()
        git(tmp_path, "clone", "-q", str(upstream), str(clone))
        gate = {"remote": "origin", "ref": "origin/main", "refresh_seconds": 0.5, "window": 5}
        config = receiver_config(
            home,
            clone,
            # A receiver killed mid-commit leaves its marker; the survivor takes it over.
            storage={**s3_storage, "data_dir": str(home / "data"), "commit_timeout_seconds": 3.0},
            index={"type": "postgresql", "dsn": postgres_dsn},
            version_gate=gate,
        )
        config["storage"].pop("min_free_bytes", None)
        receivers.append(ReceiverProcess(write_toml(home / "receiver.toml", config)).start())
    nginx = start_nginx(tmp_path / "nginx", [r.port for r in receivers])
    commit = head_commits(maintainer, 1)[0]
    yield Fleet(receivers, nginx, postgres_dsn, s3_storage["bucket"], seaweedfs, maintainer, commit)
    nginx.stop()
    for receiver in receivers:
        if receiver.proc is not None and receiver.proc.poll() is None:
            receiver.stop()


def put_until_stored(url: str, episode: str, body: bytes, commit: str) -> list[int]:
    """PUT until 201/200, retrying what the contract says is transient; the answers seen."""
    answers: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = httpx.put(
                f"{url}/episodes/lab-07/{episode}",
                content=body,
                headers={"X-Code-Commit": commit},
                timeout=30,
            )
        except httpx.TransportError:
            answers.append(-1)  # a receiver killed under us
            time.sleep(0.1)
            continue
        answers.append(response.status_code)
        if response.status_code in (200, 201):
            return answers
        assert response.status_code in (423, 429, 502, 503), response.text
        time.sleep(0.05)
    raise AssertionError(f"{episode} never stored: {answers}")


def assert_one_row_and_one_object_each(fleet: Fleet, bodies: dict[str, bytes]) -> None:
    rows = fleet.rows()
    assert sorted(r["episode_id"] for r in rows) == sorted(bodies)  # one row per id
    stored = fleet.episode_objects()
    assert sorted(stored) == sorted(f"{PREFIX}lab-07/{name}.tar.zst" for name in bodies)
    for row in rows:
        sha = hashlib.sha256(bodies[row["episode_id"]]).hexdigest()
        assert row["sha256"] == sha
        assert stored[f"{PREFIX}lab-07/{row['episode_id']}.tar.zst"]["Metadata"]["sha256"] == sha


def test_sixteen_clients_upload_fifty_ids_through_nginx_and_straight_to_each_receiver(
    fleet: Fleet,
) -> None:
    bodies = {f"ep-{n:02d}": make_tarball(fleet.commit) for n in range(50)}
    answers: list[int] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        url = fleet.urls[number % 3]
        for name in list(bodies)[number % 4 :: 2]:  # ids overlap across clients
            seen = put_until_stored(url, name, bodies[name], fleet.commit)
            with lock:
                answers.extend(seen)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 201, 423, 429, 503}
    assert answers.count(201) == len(bodies)  # every id stored once, the rest are retries
    assert_one_row_and_one_object_each(fleet, bodies)
    assert fleet.helpers() == [] and unfinished_uploads(fleet.seaweed, fleet.bucket) == []
    # Every receiver's page shows the whole fleet: one refusal on one, seen on the other.
    refused = httpx.put(f"{fleet.receivers[0].url}/episodes/lab-07/old", content=b"x",
                        headers={"X-Code-Commit": "0" * 40})  # fmt: skip
    assert refused.status_code == 412
    deadline = time.monotonic() + 10
    while "unknown-commit" not in httpx.get(f"{fleet.receivers[1].url}/").text:
        assert time.monotonic() < deadline, "the other receiver's page never showed it"
        time.sleep(0.2)
    card = '<div class="card" id="total-episodes"><div class="label">Episodes</div>'
    for receiver in fleet.receivers:
        assert f'{card}<div class="value">50</div>' in httpx.get(f"{receiver.url}/").text


def hold_an_upload(receiver: ReceiverProcess, episode: str, commit: str) -> socket.socket:
    """A PUT whose body stops after its first bytes: the receiver claims the id and waits."""
    sock = socket.create_connection(("127.0.0.1", receiver.port))
    head = (
        f"PUT /episodes/lab-07/{episode} HTTP/1.1\r\nHost: x\r\nX-Code-Commit: {commit}\r\n"
        f"Content-Length: {64 << 20}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\0" * 65536)
    return sock


def test_a_receiver_killed_mid_uploads_leaves_nothing_partial_and_its_claims_go(
    fleet: Fleet,
) -> None:
    bodies = {
        f"ep-{n:02d}": make_tarball(fleet.commit, {"d.bin": bytes(3 << 20)}) for n in range(24)
    }
    victim, survivor = fleet.receivers
    held = hold_an_upload(victim, "held", fleet.commit)
    deadline = time.monotonic() + 5
    while httpx.put(f"{survivor.url}/episodes/lab-07/held", content=b"x",
                    headers={"X-Code-Commit": fleet.commit}).status_code != 423:  # fmt: skip
        assert time.monotonic() < deadline, "the victim never claimed the id"
        time.sleep(0.05)
    done: list[str] = []

    def ship(names: list[str]) -> None:
        for name in names:
            put_until_stored(fleet.nginx.url, name, bodies[name], fleet.commit)
            done.append(name)

    names = list(bodies)
    threads = [threading.Thread(target=ship, args=(names[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    while len(done) < 4:
        time.sleep(0.01)
    victim.kill()  # SIGKILL, with uploads in flight on it
    held.close()
    for thread in threads:
        thread.join()
    assert_one_row_and_one_object_each(fleet, bodies)
    # Its claim went with its database session: the survivor takes the id at once.
    body = make_tarball(fleet.commit)
    assert put_until_stored(survivor.url, "held", body, fleet.commit) == [201]
    # What the killed receiver left half-done, its own restart cleans up.
    victim.start()
    assert fleet.helpers() == [] and unfinished_uploads(fleet.seaweed, fleet.bucket) == []
    assert_one_row_and_one_object_each(fleet, {**bodies, "held": body})


def test_a_commit_pushed_upstream_is_accepted_by_both_and_a_failing_fetch_keeps_the_window(
    fleet: Fleet,
) -> None:
    pushed = add_commit(fleet.maintainer, "fix")
    git(fleet.maintainer, "push", "-q", "origin", "main")
    for receiver in fleet.receivers:
        deadline = time.monotonic() + 5
        while httpx.get(f"{receiver.url}/gate/{pushed}").status_code != 200:
            assert time.monotonic() < deadline, f"{receiver.url} never saw {pushed}"
            time.sleep(0.1)
    broken = fleet.receivers[1].config_path.parent / "lab-code"
    git(broken, "remote", "set-url", "origin", str(broken.parent / "gone.git"))
    newer = add_commit(fleet.maintainer, "another")
    git(fleet.maintainer, "push", "-q", "origin", "main")
    time.sleep(1.5)  # three refresh intervals
    gate = httpx.get(f"{fleet.receivers[1].url}/healthz").json()["gate"]
    assert gate["refresh_failures"] >= 1 and "git fetch origin" in gate["last_error"]
    assert httpx.get(f"{fleet.receivers[1].url}/gate/{pushed}").status_code == 200  # kept
    assert httpx.get(f"{fleet.receivers[0].url}/gate/{newer}").status_code == 200


def test_two_shippers_through_nginx_ship_everything_and_export_gets_each_row_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    configs = []
    for number in range(2):
        home = tmp_path / f"shipper-{number}"
        home.mkdir()
        spool = home / "spool"
        spool.mkdir()
        for episode in range(8):
            write_episode(spool, f"s{number}-ep-{episode}", commit=fleet.commit)
        configs.append(shipper_config(home, fleet.nginx.url, host_id=f"lab-{number}"))
    out = tmp_path / "export.jsonl"
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda c=c: results.append(shipper_cli("once", "--config", str(c)).returncode)
        )
        for c in configs
    ]
    for thread in threads:
        thread.start()
    assert export(fleet.receivers[0].config_path, out).returncode == 0  # during the uploads
    for thread in threads:
        thread.join()
    assert results == [0, 0]
    assert export(fleet.receivers[1].config_path, out).returncode == 0  # and after
    exported = [line for line in out.read_text().splitlines() if line]
    keys = [(r["host_id"], r["episode_id"]) for r in map(_loads, exported)]
    assert sorted(keys) == sorted((r["host_id"], r["episode_id"]) for r in fleet.rows())
    assert len(keys) == len(set(keys)) == 16


def _loads(line: str) -> dict[str, Any]:
    import json

    value: dict[str, Any] = json.loads(line)
    return value


def test_verify_and_backfill_work_on_the_shared_backends(fleet: Fleet) -> None:
    bodies = {f"ep-{n}": make_tarball(fleet.commit) for n in range(5)}
    for name, body in bodies.items():
        assert put_until_stored(fleet.nginx.url, name, body, fleet.commit)[-1] == 201
    config = fleet.receivers[0].config_path

    def tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", module, "--config", str(config), *args]
        return subprocess.run(
            command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120
        )

    clean = tool("tools.verify", "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM episodes WHERE episode_id = 'ep-3'")  # a lost row
    lost = tool("tools.verify", "--json")
    assert lost.returncode == 1
    assert [t["episode_id"] for t in json.loads(lost.stdout)["orphaned"]] == ["ep-3"]
    repaired = tool("tools.index_backfill")
    assert repaired.returncode == 0, repaired.stderr
    assert "added lab-07/ep-3" in repaired.stdout
    [row] = [r for r in fleet.rows() if r["episode_id"] == "ep-3"]
    assert row["backfilled"] is True and row["commit"] == fleet.commit
    assert tool("tools.verify").returncode == 0
