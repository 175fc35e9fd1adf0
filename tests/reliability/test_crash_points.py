"""SIGKILL at every failpoint of the write path, restart, and check the promise.

For each point: a real receiver with the failpoint set takes a real upload and
dies there; the state it leaves is the one that point describes; a clean restart
recovers it (acknowledged episodes intact, no partial file under a final name,
the index parses, no temp file); a retry ends in exactly one row, 200 or 201.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from receiver import failpoints
from tests.reliability.conftest import Receiver, episode, sha256
from tests.reliability.invariants import check_invariants
from tests.support import PROJECT_ROOT, write_toml


@dataclass(frozen=True)
class AtCrash:
    """What the data_dir holds for the crashed upload when the process has died."""

    installed: bool  # under its final name
    indexed: bool  # a complete row
    torn: bool  # the index ends in half a row
    temp: bool  # its temp name still exists
    retry_status: int  # what a retry after the restart gets


EXPECTED = {
    failpoints.AFTER_TEMP_WRITE: AtCrash(False, False, False, True, 201),
    failpoints.AFTER_FSYNC: AtCrash(False, False, False, True, 201),
    failpoints.AFTER_INSTALL: AtCrash(True, False, False, True, 200),
    failpoints.DURING_INDEX_APPEND: AtCrash(True, False, True, True, 200),
    failpoints.BEFORE_VIEW_UPDATE: AtCrash(True, True, False, True, 200),
    failpoints.AFTER_INDEX_APPEND: AtCrash(True, True, False, True, 200),
    failpoints.BEFORE_RESPONSE: AtCrash(True, True, False, False, 200),
}

HOST = "lab-1"
ACKED = (HOST, "ep-acked")
CRASHED = (HOST, "ep-crash")


def test_every_failpoint_has_an_expectation() -> None:
    assert set(EXPECTED) == set(failpoints.POINTS)


def test_unknown_failpoint_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.parse("after-fsync, after-fsnyc")
    assert failpoints.parse(" after-fsync,,before-response ") == {
        failpoints.AFTER_FSYNC,
        failpoints.BEFORE_RESPONSE,
    }


def crash_at(receiver: Receiver, point: str, commit: str, body: bytes) -> None:
    """Start with the failpoint, upload, and see the process SIGKILL itself."""
    receiver.start(failpoints=point)
    with pytest.raises(httpx.TransportError):
        receiver.put(*CRASHED, body, commit)
    assert receiver.wait_dead() == -signal.SIGKILL, receiver.log()


@pytest.mark.parametrize("point", failpoints.POINTS)
def test_crash_at_failpoint_then_restart_keeps_the_promise(
    point: str, receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    data = receiver.data_dir
    receiver.start()
    acked_body = episode(commit, seed=1)
    assert receiver.put(*ACKED, acked_body, commit).status_code == 201
    acked = {ACKED: sha256(acked_body)}

    body = episode(commit, seed=2)
    sha = sha256(body)
    crash_at(receiver, point, commit, body)
    expect = EXPECTED[point]
    state = check_invariants(data, acked, {CRASHED: {sha}}, after_restart=False)
    assert (CRASHED in state.files) == expect.installed
    assert (CRASHED in state.rows) == expect.indexed
    assert bool(state.torn_tail) == expect.torn
    assert bool(state.temp_files) == expect.temp

    receiver.start()
    state = check_invariants(data, acked, {CRASHED: {sha}})
    # An installed file is indexed by the restart (its temp name says which commit).
    assert (CRASHED in state.rows) == expect.installed
    if expect.installed:
        row = state.rows[CRASHED]
        assert (row.sha256, row.size_bytes, row.commit) == (sha, len(body), commit)
    assert len(list(data.glob("index.jsonl.torn-*"))) == expect.torn

    retry = receiver.put(*CRASHED, body, commit)
    assert retry.status_code == expect.retry_status, retry.text
    assert retry.json()["sha256"] == sha
    acked[CRASHED] = sha
    state = check_invariants(data, acked)
    assert set(state.rows) == {ACKED, CRASHED}


def test_crash_during_index_append_keeps_the_half_row_aside(
    receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    data = receiver.data_dir
    receiver.start()
    acked_body = episode(commit, seed=1)
    assert receiver.put(*ACKED, acked_body, commit).status_code == 201
    before = (data / "index.jsonl").read_bytes()
    crash_at(receiver, failpoints.DURING_INDEX_APPEND, commit, episode(commit, seed=2))
    torn = (data / "index.jsonl").read_bytes()
    assert torn.startswith(before) and len(torn) > len(before) and not torn.endswith(b"\n")

    receiver.start()
    (side,) = data.glob("index.jsonl.torn-*")
    assert side.read_bytes() == torn[len(before) :]
    assert (data / "index.jsonl").read_bytes().startswith(before)


def write_shipper_config(tmp_path: Path, url: str) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    config = {
        "host_id": HOST,
        "receiver_url": url,
        "spool_dir": str(spool),
        "state_dir": str(tmp_path / "state"),
        "settle_seconds": 0.0,
        "request_timeout_seconds": 10.0,
        "retry": {"base_seconds": 0.05, "max_seconds": 0.1},
        "retention": {"delete_after_days": 0.0},
    }
    return write_toml(tmp_path / "shipper.toml", config)


def shipper_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipper", "once", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )


@pytest.mark.parametrize("point", failpoints.POINTS)
def test_shipper_retry_after_a_crash_at_failpoint_ends_in_one_row(
    point: str, tmp_path: Path, receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver.start(failpoints=point)
    config = write_shipper_config(tmp_path, receiver.url)
    body = episode(commit, seed=3)
    (tmp_path / "spool" / f"{CRASHED[1]}.tar.zst").write_bytes(body)

    first = shipper_once(config)
    assert receiver.wait_dead() == -signal.SIGKILL, receiver.log()
    assert first.returncode == 1, first.stderr  # some left to retry: nothing was confirmed

    receiver.start()
    second = shipper_once(config)
    assert second.returncode == 0, second.stderr
    check_invariants(receiver.data_dir, {CRASHED: sha256(body)})
    assert not (tmp_path / "spool" / f"{CRASHED[1]}.tar.zst").exists()  # confirmed, deleted
