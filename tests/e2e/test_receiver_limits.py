"""Limits and graceful shutdown, against real receiver processes and raw sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from episode_common.config_loading import ConfigError
from receiver.config import load_config
from receiver.errors import InsufficientStorage, ServerBusy, TooManyUploadsFromHost
from receiver.limits import UploadAdmission
from receiver.receiving import SMALL_BODY_BYTES
from tests.conftest import StartReceiver
from tests.e2e.test_receiver_protocol import HEADER, index_rows, put, stored_files, temp_files
from tests.support import PROJECT_ROOT, head_commits, make_tarball, receiver_config, write_toml


def open_upload(
    port: int, path: str, commit: str, length: int, first: bytes = b""
) -> socket.socket:
    """Start a PUT and leave it hanging mid-body."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\n{HEADER}: {commit}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        + first
    )
    return sock


def read_response(sock: socket.socket, timeout: float = 20) -> tuple[int, dict[str, object]]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def uploads_in_progress(url: str) -> int:
    """Uploads holding a slot, from /healthz: the signal that a hanging PUT has been admitted.

    (A temp file is no such signal: a small body is stored only once it is complete.)
    """
    value = httpx.get(f"{url}/healthz", timeout=5).json()["uploads_in_progress"]
    assert isinstance(value, int)
    return value


def wait_for(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_admission_caps_and_reservations_unit() -> None:
    admission = UploadAdmission(max_total=2, max_per_host=1, min_free_bytes=100)
    with admission.slot("a"):
        with pytest.raises(TooManyUploadsFromHost):
            with admission.slot("a"):
                pass
        with admission.slot("b"):
            with pytest.raises(ServerBusy):
                with admission.slot("c"):
                    pass
    assert admission.active == 0
    with admission.reservation(free_bytes=1000, needed=800):
        assert admission.reserved_bytes == 800
        with pytest.raises(InsufficientStorage):
            admission.check_space(1000, 200)  # 1000 - 800 - 200 < 100
        admission.check_space(1000, 0, mine=800)  # the upload's own reservation is not counted
    assert admission.reserved_bytes == 0


def test_concurrency_caps_answer_503_and_429(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(
        repo, server={"max_concurrent_uploads": 2, "max_concurrent_uploads_per_host": 1}
    )
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    first = open_upload(receiver.port, "/episodes/a/e1", head, len(body), body[:10])
    second = open_upload(receiver.port, "/episodes/b/e1", head, len(body), body[:10])
    wait_for(lambda: uploads_in_progress(receiver.url) == 2)
    same_host = put(receiver.url, "/episodes/a/e2", body, head)
    assert same_host.status_code == 429
    assert same_host.json()["error"] == "too-many-uploads"
    assert int(same_host.headers["retry-after"]) > 0
    third = put(receiver.url, "/episodes/c/e1", body, head)
    assert third.status_code == 503
    assert third.json()["error"] == "server-busy"
    for sock in (first, second):
        sock.sendall(body[10:])
        assert read_response(sock)[0] == 201
        sock.close()
    assert put(receiver.url, "/episodes/c/e1", body, head).status_code == 201


def test_507_counts_space_reserved_by_uploads_in_flight(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    free = shutil.disk_usage(tmp_path).free
    gib = 1024**3
    receiver = start_receiver(repo, storage={"min_free_bytes": max(0, free - 3 * gib)})
    head = head_commits(repo, 1)[0]
    # Declared 2 GiB fits (free - 2 GiB > min_free, by about 1 GiB) ...
    first = open_upload(receiver.port, "/episodes/h/e1", head, 2 * gib, b"\x28\xb5")
    wait_for(lambda: len(temp_files(tmp_path / "data")) == 1)
    # ... but a second 2 GiB upload does not, because the first one reserved its bytes.
    sock = open_upload(receiver.port, "/episodes/h/e2", head, 2 * gib)
    status, body = read_response(sock)
    sock.close()
    assert status == 507 and body["error"] == "insufficient-storage"
    first.close()
    wait_for(lambda: not temp_files(tmp_path / "data"))
    assert stored_files(tmp_path / "data") == []


def test_slow_client_gets_408_and_its_temp_file_is_removed(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, server={"body_timeout_seconds": 1})
    head = head_commits(repo, 1)[0]
    # Over SMALL_BODY_BYTES, so the body streams to a temp file from its first byte.
    body = make_tarball(head, {"data/x.bin": os.urandom(SMALL_BODY_BYTES + 1)})
    sock = open_upload(receiver.port, "/episodes/h/e", head, len(body), body[:10])
    wait_for(lambda: len(temp_files(tmp_path / "data")) == 1, timeout=0.9)
    status, answer = read_response(sock)
    sock.close()
    assert status == 408 and answer["error"] == "body-timeout"
    wait_for(lambda: not temp_files(tmp_path / "data"))
    assert stored_files(tmp_path / "data") == [] and index_rows(tmp_path / "data") == []


def test_sigterm_lets_in_flight_uploads_finish_then_exits_0(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, server={"shutdown_grace_seconds": 10})
    head = head_commits(repo, 1)[0]
    body = make_tarball(head)
    sock = open_upload(receiver.port, "/episodes/h/e", head, len(body), body[:10])
    wait_for(lambda: uploads_in_progress(receiver.url) == 1)
    assert receiver.proc is not None
    receiver.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    sock.sendall(body[10:])
    status, answer = read_response(sock)
    sock.close()
    assert status == 201, answer
    assert receiver.proc.wait(20) == 0
    assert len(index_rows(tmp_path / "data")) == 1
    assert temp_files(tmp_path / "data") == []


def test_sigterm_aborts_uploads_that_outlast_the_grace_period(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, server={"shutdown_grace_seconds": 1})
    head = head_commits(repo, 1)[0]
    body = make_tarball(head, {"data/x.bin": os.urandom(1 << 20)})
    sock = open_upload(receiver.port, "/episodes/h/e", head, len(body), body[:1000])
    wait_for(lambda: len(temp_files(tmp_path / "data")) == 1)
    assert receiver.proc is not None
    started = time.monotonic()
    receiver.proc.send_signal(signal.SIGTERM)
    assert receiver.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    sock.close()
    data = tmp_path / "data"
    assert stored_files(data) == [] and index_rows(data) == [] and temp_files(data) == []


def test_anonymous_receiver_refuses_a_non_loopback_address(tmp_path: Path, repo: Path) -> None:
    config = receiver_config(tmp_path, repo, server={"host": "0.0.0.0"})
    path = write_toml(tmp_path / "receiver.toml", config)
    with pytest.raises(ConfigError, match="allow_anonymous_remote"):
        load_config(path)
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "server.host" in result.stderr
    config["server"]["allow_anonymous_remote"] = True
    assert load_config(write_toml(path, config)).server.host == "0.0.0.0"
