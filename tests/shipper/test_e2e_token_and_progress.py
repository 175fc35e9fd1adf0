"""Real shipper and receiver processes: a rotated token is held then ships; upload progress."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shipper.config import load_config
from shipper.queue import Queue
from shipper.report import status_document
from shipper.states import connect
from tests.shipper.conftest import write_episode
from tests.shipper.processes import (
    ShipperProcess,
    index_rows,
    queue_states,
    shipper_cli,
    shipper_config,
    wait_for,
)
from tests.support import PROJECT_ROOT, ReceiverProcess, make_repo, receiver_config, write_toml


def add_host(receiver_config: Path, *extra: str) -> str:
    """`episode-receiver add-host lab-1`: the token, printed once."""
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "add-host", "lab-1", *extra]
        + ["--config", str(receiver_config)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    return result.stdout.strip()


def test_e2e_a_rotated_token_is_held_then_ships_without_a_restart(tmp_path: Path) -> None:
    head = make_repo(tmp_path / "repo", commits=2)[0]
    auth = {"mode": "tokens", "tokens_file": str(tmp_path / "tokens.toml")}
    receiver_path = write_toml(
        tmp_path / "receiver.toml", receiver_config(tmp_path, tmp_path / "repo", auth=auth)
    )
    token_file = tmp_path / "token"
    token_file.write_text(add_host(receiver_path) + "\n")
    receiver = ReceiverProcess(receiver_path).start()
    retry = {"base_seconds": 0.1, "max_seconds": 1.0}
    config = shipper_config(tmp_path, receiver.url, token_file=str(token_file), retry=retry)
    spool = tmp_path / "spool"
    write_episode(spool, "ep-1", head)
    shipper = ShipperProcess(config).start()
    try:
        wait_for(lambda: len(index_rows(tmp_path / "data")) == 1, 20, "ep-1 in the index")
        new_token = add_host(receiver_path, "--rotate")  # the old token stops working
        time.sleep(1.2)  # the receiver re-reads its tokens file within a second
        write_episode(spool, "ep-2", head)
        wait_for(lambda: "refuses our token" in shipper.log(), 20, "the 401 to be logged")
        wait_for(lambda: shipper.log().count("ep-2: still held") >= 2, 10, "two slow retries")
        status = json.loads(shipper_cli("status", "--config", str(config), "--json").stdout)
        text = shipper_cli("status", "--config", str(config)).stdout
        assert queue_states(tmp_path / "state")["ep-2"] == "retry-wait"
        token_file.write_text(new_token + "\n")  # the operator installs the new token
        wait_for(lambda: len(index_rows(tmp_path / "data")) == 2, 10, "ep-2 in the index")
    finally:
        assert shipper.stop() == 0
        receiver.stop()
    log = shipper.log()
    (error,) = [line for line in log.splitlines() if " ERROR " in line]
    assert "HTTP 401 unauthorized: unknown token" in error and str(token_file) in error
    assert "accepts our token again" in log
    (episode,) = [e for e in status["episodes"] if e["episode_id"] == "ep-2"]
    assert episode["state"] == "retry-wait" and "held: HTTP 401" in episode["reason"]
    assert "receiver: refuses our token" in text
    assert set(queue_states(tmp_path / "state").values()) == {"shipped"}


def test_e2e_status_shows_an_upload_in_flight_and_long_uploads_log_progress(
    tmp_path: Path,
) -> None:
    head = make_repo(tmp_path / "repo", commits=2)[0]
    receiver_path = write_toml(
        tmp_path / "receiver.toml", receiver_config(tmp_path, tmp_path / "repo")
    )
    receiver = ReceiverProcess(receiver_path).start()
    config_path = shipper_config(
        tmp_path,
        receiver.url,
        concurrency=1,
        zstd_level=1,
        progress_record_seconds=0.01,
        progress_log_seconds=0.02,
    )
    for n in range(3):
        write_episode(tmp_path / "spool", f"big-{n}", head, {"raw.bin": os.urandom(48 << 20)})
    config = load_config(config_path)
    seen: list[dict[str, Any]] = []
    shipper = ShipperProcess(config_path).start()
    try:
        wait_for(lambda: (config.state_dir / "queue.db").exists(), 10, "the queue")
        time.sleep(0.2)  # its schema
        queue = Queue(connect(config.state_dir / "queue.db", create=False))
        try:
            deadline = time.monotonic() + 60
            while len(index_rows(tmp_path / "data")) < 3 and time.monotonic() < deadline:
                document = status_document(config, queue)
                seen += [e["upload"] for e in document["episodes"] if e["upload"]]
                time.sleep(0.005)
        finally:
            queue.close()
    finally:
        assert shipper.stop() == 0
        receiver.stop()
    assert len(index_rows(tmp_path / "data")) == 3
    assert seen, "status never showed an upload in flight"
    partial = [u for u in seen if 0 < u["sent_bytes"] < u["size_bytes"]]
    assert partial, seen
    assert all(u["bytes_per_second"] > 0 and u["eta_seconds"] is not None for u in partial)
    assert re.search(r"big-\d: uploading, [\d.]+ MiB of [\d.]+ MiB \(\d+%\), ", shipper.log())
    assert not (config.state_dir / "uploads.json").read_text().strip("{} ")
