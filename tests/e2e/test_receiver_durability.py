"""Crashes, concurrency and recovery, against real receiver processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.e2e.test_receiver_limits import open_upload, uploads_in_progress, wait_for
from tests.e2e.test_receiver_protocol import HEADER, index_rows, put, stored_files, temp_files
from tests.support import (
    PROJECT_ROOT,
    add_commit,
    head_commits,
    make_tarball,
)


def test_kill_9_mid_upload_leaves_nothing_partial_and_the_retry_succeeds(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/big.bin": os.urandom(4 * 1024 * 1024)})
    data = tmp_path / "data"
    with open_upload(receiver.port, "/episodes/h/e", head, len(body), body[: len(body) // 2]):
        deadline = time.monotonic() + 10
        while not temp_files(data):  # the upload is under way
            assert time.monotonic() < deadline
            time.sleep(0.02)
        receiver.kill()
    assert stored_files(data) == []
    assert index_rows(data) == []

    receiver.start()
    assert temp_files(data) == []  # removed at start
    retry = put(receiver.url, "/episodes/h/e", body, head)
    assert retry.status_code == 201
    assert (data / "episodes" / "h" / "e.tar.zst").read_bytes() == body
    assert len(index_rows(data)) == 1


def test_client_that_disconnects_mid_body_leaves_no_temp_file(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/big.bin": os.urandom(1024 * 1024)})
    data = tmp_path / "data"
    with open_upload(receiver.port, "/episodes/h/e", head, len(body), body[:1000]):
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while temp_files(data):
        assert time.monotonic() < deadline, temp_files(data)
        time.sleep(0.05)
    assert stored_files(data) == [] and index_rows(data) == []
    assert put(receiver.url, "/episodes/h/e", body, head).status_code == 201


def test_second_upload_of_an_id_in_flight_gets_423(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    with open_upload(receiver.port, "/episodes/h/e", head, len(body), body[:10]) as sock:
        wait_for(lambda: uploads_in_progress(receiver.url) == 1)
        second = put(receiver.url, "/episodes/h/e", body, head)
        assert second.status_code == 423
        assert second.json()["error"] == "upload-in-flight"
        assert int(second.headers["retry-after"]) > 0
        sock.sendall(body[10:])
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 201")
    assert len(index_rows(tmp_path / "data")) == 1


def put_retrying(url: str, path: str, body: bytes, commit: str) -> httpx.Response:
    """PUT, retrying 423/429/503 as a shipper would (briefly: these tests are small)."""
    for _attempt in range(300):
        response = put(url, path, body, commit)
        if response.status_code not in (423, 429, 503):
            return response
        time.sleep(0.02)
    return response


def _concurrent_same_id(url: str, head: str, body: bytes, clients: int) -> list[int]:
    statuses: list[int] = []
    barrier = threading.Barrier(clients)

    def one(_: int) -> int:
        barrier.wait()
        return put_retrying(url, "/episodes/h/same", body, head).status_code

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(clients)))
    return statuses


def test_concurrent_uploads_of_one_id_index_once(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/x.bin": os.urandom(256 * 1024)})
    statuses = _concurrent_same_id(receiver.url, head, body, clients=8)
    assert sorted(statuses) == [200] * 7 + [201]
    rows = index_rows(tmp_path / "data")
    assert len(rows) == 1 and rows[0]["sha256"] == hashlib.sha256(body).hexdigest()


def test_two_workers_arbitrate_one_id_and_share_the_index(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, server={"workers": 2})
    head = head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/x.bin": os.urandom(256 * 1024)})
    statuses = _concurrent_same_id(receiver.url, head, body, clients=8)
    assert sorted(statuses) == [200] * 7 + [201]
    # Both workers see every row: many distinct uploads, then retries of each.
    bodies = {f"e{i}": make_tarball(head) for i in range(20)}
    with ThreadPoolExecutor(8) as pool:
        first = list(
            pool.map(
                lambda i: put_retrying(receiver.url, f"/episodes/h/{i}", bodies[i], head), bodies
            )
        )
        again = list(
            pool.map(
                lambda i: put_retrying(receiver.url, f"/episodes/h/{i}", bodies[i], head), bodies
            )
        )
    assert [r.status_code for r in first] == [201] * 20
    assert [r.status_code for r in again] == [200] * 20
    rows = index_rows(tmp_path / "data")
    keys = [(r["host_id"], r["episode_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 21
    pids = {httpx.get(f"{receiver.url}/healthz").json()["pid"] for _ in range(40)}
    assert len(pids) == 2, "both workers should have answered"


def test_twelve_hosts_uploading_concurrently_lose_nothing(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    uploads = {(f"lab-{h:02d}", f"ep-{e}"): make_tarball(head) for h in range(12) for e in range(5)}

    def one(key: tuple[str, str]) -> int:
        path = f"/episodes/{key[0]}/{key[1]}"
        return put_retrying(receiver.url, path, uploads[key], head).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(one, uploads))
    assert statuses == [201] * len(uploads)
    rows = index_rows(tmp_path / "data")
    assert {(r["host_id"], r["episode_id"]) for r in rows} == set(uploads)
    assert len(rows) == len(uploads)
    for (host, episode), body in uploads.items():
        path = tmp_path / "data" / "episodes" / host / f"{episode}.tar.zst"
        assert path.read_bytes() == body


def test_git_failing_keeps_the_window(repo: Path, start_receiver: StartReceiver) -> None:
    receiver = start_receiver(repo, version_gate={"refresh_seconds": 0.2})
    head = head_commits(repo, 1)[0]
    shutil.move(repo / ".git", repo.parent / "moved.git")
    deadline = time.monotonic() + 10
    while httpx.get(f"{receiver.url}/healthz").json()["gate"]["refresh_failures"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    response = put(receiver.url, "/episodes/h/e", make_tarball(head), head)
    assert response.status_code == 201
    gate = httpx.get(f"{receiver.url}/healthz").json()["gate"]
    assert gate["head_commit"] == head and gate["last_error"]
    assert receiver.log().count("refresh failed") <= 1  # logged once per failure streak


def test_torn_index_tail_is_repaired_at_start_with_a_copy_kept(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    assert put(receiver.url, "/episodes/h/e1", make_tarball(head), head).status_code == 201
    receiver.stop()
    index = tmp_path / "data" / "index.jsonl"
    good = index.read_bytes()
    torn = b'{"commit": "abc", "episode_id": "e2", "host'
    index.write_bytes(good + torn)
    receiver.start()
    assert index.read_bytes() == good
    side = list(index.parent.glob("index.jsonl.torn-*"))
    assert len(side) == 1 and side[0].read_bytes() == torn
    assert put(receiver.url, "/episodes/h/e2", make_tarball(head), head).status_code == 201
    assert [r["episode_id"] for r in index_rows(tmp_path / "data")] == ["e1", "e2"]
    receiver.stop()


def test_corrupt_middle_line_stops_the_start_with_one_line(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    for name in ("e1", "e2"):
        assert put(receiver.url, f"/episodes/h/{name}", make_tarball(head), head).status_code == 201
    receiver.stop()
    index = tmp_path / "data" / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + "garbage that is not json\n" + lines[1])
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "serve", "--config", str(receiver.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "line 2" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_installed_file_without_row_is_indexed_at_start(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    # What a crash between the install (link) and the index append leaves behind.
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    data = tmp_path / "data"
    (data / "episodes" / "h").mkdir(parents=True)
    (data / "tmp" / "h").mkdir(parents=True)
    temp = data / "tmp" / "h" / f"e~{head}~0123456789ab.part"
    temp.write_bytes(body)
    os.link(temp, data / "episodes" / "h" / "e.tar.zst")
    stale = data / "tmp" / "h" / f"other~{head}~ba9876543210.part"
    stale.write_bytes(b"half an upload")
    receiver = start_receiver(repo)
    rows = index_rows(data)
    assert len(rows) == 1
    assert rows[0]["commit"] == head and rows[0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert "backfilled" not in rows[0]
    assert temp_files(data) == []
    assert put(receiver.url, "/episodes/h/e", body, head).status_code == 200
    receiver.stop()


def test_stored_file_whose_row_was_lost_is_repaired_on_access(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    data = tmp_path / "data"
    (data / "episodes" / "h").mkdir(parents=True)
    (data / "episodes" / "h" / "e.tar.zst").write_bytes(body)  # e.g. restored from backup
    receiver = start_receiver(repo)
    head_response = httpx.head(f"{receiver.url}/episodes/h/e")
    assert head_response.status_code == 200
    rows = index_rows(data)
    assert len(rows) == 1 and rows[0]["backfilled"] is True and rows[0]["commit"] == head
    assert put(receiver.url, "/episodes/h/e", body, head).status_code == 200
    assert len(index_rows(data)) == 1


def test_rows_appended_by_another_process_are_picked_up(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    (tmp_path / "data" / "episodes" / "h").mkdir(parents=True)
    (tmp_path / "data" / "episodes" / "h" / "e.tar.zst").write_bytes(body)
    row = {
        "commit": head,
        "episode_id": "e",
        "host_id": "h",
        "received_at_wall": "2026-11-22T10:00:00.000000+00:00",
        "schema_version": 1,
        "sha256": hashlib.sha256(body).hexdigest(),
        "size_bytes": len(body),
        "backfilled": True,
    }
    with (tmp_path / "data" / "index.jsonl").open("a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
    other = put(receiver.url, "/episodes/h/e", make_tarball(head), head)
    assert other.status_code == 409
    assert other.json()["stored_sha256"] == row["sha256"]
    assert len(index_rows(tmp_path / "data")) == 1
    add_commit(repo)


def test_indexed_episode_whose_file_was_lost_is_restored_by_a_reupload(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, version_gate={"window": 2})
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    assert put(receiver.url, "/episodes/h/e", body, head).status_code == 201
    stored = tmp_path / "data" / "episodes" / "h" / "e.tar.zst"
    stored.unlink()  # a disk replaced, a file deleted by hand
    for _ in range(3):
        add_commit(repo)  # the commit has left the window meanwhile
    # HEAD no longer claims the episode is stored, so a shipper sends it again ...
    assert httpx.head(f"{receiver.url}/episodes/h/e", headers={HEADER: head}).status_code == 404
    # ... other content is refused, the same content restores the file, without a second row.
    other = put(receiver.url, "/episodes/h/e", make_tarball(head), head)
    assert other.status_code == 409 and not stored.exists()
    restored = put(receiver.url, "/episodes/h/e", body, head)
    assert restored.status_code == 201, restored.text
    assert stored.read_bytes() == body
    assert len(index_rows(tmp_path / "data")) == 1
    assert temp_files(tmp_path / "data") == []
    assert put(receiver.url, "/episodes/h/e", body, head).status_code == 200
