"""Backfill beside a live receiver: uploads, hand-placed tarballs and repeated backfills at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from receiver.storage.rows import decode_row
from tests.conftest import StartReceiver
from tests.support import PROJECT_ROOT, head_commits, make_tarball
from tests.tools.conftest import Tool

UPLOADERS = 4
UPLOADS_EACH = 10
HAND_PLACED = 16
HEADER = "X-Code-Commit"


def _backfill_process(data: Path) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "tools.index_backfill", "--json"]
    command += ["--episodes-root", str(data / "episodes"), "--index", str(data / "index.jsonl")]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, timeout=60)


@pytest.mark.parametrize("workers", [1, 2])
def test_backfill_beside_a_live_receiver_leaves_one_row_per_tarball(
    workers: int, tmp_path: Path, repo: Path, start_receiver: StartReceiver, backfill: Tool
) -> None:
    receiver = start_receiver(repo, server={"workers": workers})
    commit = head_commits(repo, 1)[0]
    data = tmp_path / "data"
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    busy = threading.Event()
    busy.set()
    runs: list[subprocess.CompletedProcess[bytes]] = []

    def backfill_repeatedly() -> None:
        while busy.is_set():
            runs.append(_backfill_process(data))

    def upload(uploader: int) -> None:
        for number in range(UPLOADS_EACH):
            url = f"{receiver.url}/episodes/up-{uploader}/ep-{number}"
            response = httpx.put(url, content=make_tarball(commit), headers={HEADER: commit})
            assert response.status_code == 201, response.text
            time.sleep(0.03)

    def place_by_hand() -> None:
        host_dir = data / "episodes" / "by-hand"
        host_dir.mkdir(parents=True, exist_ok=True)
        for number in range(HAND_PLACED):
            staged = incoming / f"ep-{number}.tar.zst"
            staged.write_bytes(make_tarball(commit))
            os.replace(staged, host_dir / staged.name)  # whole, as a careful operator copies
            if number % 2:  # the receiver repairs a row on access: let it race the backfill
                httpx.head(f"{receiver.url}/episodes/by-hand/ep-{number}")
            time.sleep(0.05)

    backfiller = threading.Thread(target=backfill_repeatedly)
    backfiller.start()
    try:
        with ThreadPoolExecutor(UPLOADERS + 1) as pool:
            jobs = [pool.submit(upload, n) for n in range(UPLOADERS)]
            jobs.append(pool.submit(place_by_hand))
            for job in jobs:
                job.result()
    finally:
        busy.clear()
        backfiller.join()
    with_json = [json.loads(run.stdout) for run in runs]
    assert len(runs) >= 2 and all(run.returncode == 0 for run in runs), runs[-1].stderr
    assert sum(report["summary"]["added"] for report in with_json) > 0
    # Tarballs placed after the last concurrent run started still need one more run.
    assert backfill("--episodes-root", data / "episodes", "--index", data / "index.jsonl").code == 0

    raw = (data / "index.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    rows = [decode_row(line) for line in raw.splitlines(keepends=True)]
    keys = [row.key for row in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    stored = {(p.parent.name, p.name.removesuffix(".tar.zst")) for p in data.glob("episodes/*/*")}
    assert set(keys) == stored
    assert len(stored) == UPLOADERS * UPLOADS_EACH + HAND_PLACED
    # An uploaded episode's row is always the receiver's own: backfill never took one over.
    assert all(not row.backfilled for row in rows if row.host_id.startswith("up-"))
    assert all(row.backfilled and row.commit == commit for row in rows if row.host_id == "by-hand")
    assert list(data.glob("index.jsonl.torn-*")) == []
    # Every worker's view has caught up on the others' rows and the backfill's.
    for _ in range(4 * workers):
        assert httpx.get(f"{receiver.url}/healthz").json()["index_rows"] == len(stored)
        for key in sorted(stored)[::7]:
            assert httpx.head(f"{receiver.url}/episodes/{key[0]}/{key[1]}").status_code == 200
    receiver.stop()
