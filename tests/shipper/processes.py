"""Real shipper processes for the end-to-end tests, and readers for what they leave behind."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import PROJECT_ROOT, end_process_group, write_toml


def shipper_config(tmp_path: Path, receiver_url: str, **overrides: Any) -> Path:
    """A shipper config for a real run: fast retries, no settling, spool/state in tmp_path."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "host_id": "lab-1",
        "receiver_url": receiver_url,
        "spool_dir": str(spool),
        "state_dir": str(tmp_path / "state"),
        "settle_seconds": 0,
        "rescan_seconds": 1,
        "concurrency": 2,
        "request_timeout_seconds": 10,
        "shutdown_grace_seconds": 2,
        "retry": {"base_seconds": 0.1, "max_seconds": 1.0},
    }
    data.update(overrides)
    return write_toml(tmp_path / "shipper.toml", data)


def shipper_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipper", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=timeout,
        check=False,
    )


class ShipperProcess:
    """`python -m shipper run`, its log appended to a file."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.log_path = config_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ShipperProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipper", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the shipper and anything it started (its process group)."""
        assert self.proc is not None
        end_process_group(self.proc)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            end_process_group(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def index_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The receiver's index, tolerating a torn last line."""
    path = data_dir / "index.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def assert_index_exactly_once(data_dir: Path, host_id: str, expected: set[str]) -> None:
    """Each expected episode has one row, matching the stored tarball, and nothing else."""
    rows = index_rows(data_dir)
    counts = Counter((row["host_id"], row["episode_id"]) for row in rows)
    assert counts == Counter({(host_id, episode_id): 1 for episode_id in expected}), counts
    for row in rows:
        stored = data_dir / "episodes" / row["host_id"] / f"{row['episode_id']}.tar.zst"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]


def queue_states(state_dir: Path) -> dict[str, str]:
    """episode_id -> state, read from the shipper's database without writing to it."""
    path = state_dir / "queue.db"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT episode_id, state FROM episodes").fetchall())
    except sqlite3.OperationalError:
        return {}  # the schema is not created yet
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
