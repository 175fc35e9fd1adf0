"""GET /readyz: 503 with the reason until this receiver can store an episode (not liveness)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.support import make_repo


def wait_for_status(url: str, status: int, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, timeout=5)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_not_ready_until_the_gate_loads_then_ready_without_a_restart(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    later_repo = tmp_path / "repo-later"
    later_repo.mkdir()
    receiver = start_receiver(later_repo, version_gate={"refresh_seconds": 0.2})
    response = httpx.get(f"{receiver.url}/readyz")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"] == "not-ready"
    assert "version gate has not loaded" in response.json()["detail"]
    assert httpx.get(f"{receiver.url}/healthz").status_code == 200  # alive, not ready
    shutil.rmtree(later_repo)
    make_repo(later_repo, commits=2)
    ready = wait_for_status(f"{receiver.url}/readyz", 200)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready"}


def test_not_ready_while_the_storage_cannot_take_an_upload(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    assert httpx.get(f"{receiver.url}/readyz").status_code == 200
    tmp_dir = tmp_path / "data" / "tmp"
    shutil.rmtree(tmp_dir)  # e.g. the data disk went away under the receiver
    gone = httpx.get(f"{receiver.url}/readyz")
    assert gone.status_code == 503
    assert gone.json()["detail"] == f"storage: {tmp_dir} is missing or not writable"
    tmp_dir.mkdir()
    assert httpx.get(f"{receiver.url}/readyz").status_code == 200


def test_not_ready_when_free_space_is_below_the_minimum(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, storage={"min_free_bytes": 2**62})
    response = httpx.get(f"{receiver.url}/readyz")
    assert response.status_code == 503
    assert "below min_free_bytes" in response.json()["detail"]
