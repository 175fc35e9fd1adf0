"""Real shipper processes against a real receiver and real git repositories.

Good and stale commits mixed, a receiver that is down and comes up, and a
receiver killed and restarted in the middle of an upload.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import StartReceiver
from tests.shipper.conftest import write_episode, write_tarball
from tests.shipper.processes import (
    ShipperProcess,
    assert_index_exactly_once,
    index_rows,
    queue_states,
    shipper_cli,
    shipper_config,
    wait_for,
)
from tests.support import add_commit, free_port, git, make_repo


def test_e2e_good_and_stale_commits_mixed(tmp_path: Path, start_receiver: StartReceiver) -> None:
    repo = tmp_path / "repo"
    commits = make_repo(repo, commits=8)  # newest first; the receiver's window is 5
    git(repo, "checkout", "-q", "-b", "side")
    unpushed = add_commit(repo, "not on main yet")
    git(repo, "checkout", "-q", "main")
    receiver = start_receiver(repo)
    spool = tmp_path / "spool"
    spool.mkdir()
    write_episode(spool, "good-0", commits[0])
    write_episode(spool, "good-2", commits[2])
    write_episode(spool, "edge-4", commits[4])
    write_tarball(spool, "packed-1", commits[1])
    write_episode(spool, "stale-a", commits[6])
    write_episode(spool, "stale-b", commits[6])
    write_episode(spool, "stale-c", commits[7])
    write_episode(spool, "unpushed", unpushed)
    config = shipper_config(tmp_path, receiver.url)

    first = shipper_cli("once", "--config", str(config))

    assert first.returncode == 3, first.stderr
    good = {"good-0", "good-2", "edge-4", "packed-1"}
    assert_index_exactly_once(tmp_path / "data", "lab-1", good)
    rows = {row["episode_id"]: row["commit"] for row in index_rows(tmp_path / "data")}
    assert rows == {
        "good-0": commits[0],
        "good-2": commits[2],
        "edge-4": commits[4],
        "packed-1": commits[1],
    }
    # One remediation block per refused commit, logged verbatim at ERROR.
    assert first.stderr.count("ERROR shipper.pipeline: commit ") == 3
    assert first.stderr.count(" pull --ff-only") == 3  # each block names the pull once
    for parked in ("stale-a", "stale-b", "stale-c", "unpushed"):
        assert (spool / parked / "meta.json").exists()
    status = json.loads(shipper_cli("status", "--config", str(config), "--json").stdout)
    assert status["counts"]["fatal"] == 4 and status["counts"]["shipped"] == 4
    reasons = {e["episode_id"]: e["reason"] for e in status["episodes"]}
    assert "stale-commit" in reasons["stale-b"] and "unknown-commit" in reasons["unpushed"]
    assert all(" pull --ff-only" in e["remediation"] for e in status["episodes"])
    # No body was sent for the stale ones: the receiver never stored or refused a PUT of them.
    assert not re.search(r"PUT host=lab-1 episode=stale", receiver.log())

    # The maintainer pushes the side branch: that commit is now the newest.
    git(repo, "merge", "-q", "--ff-only", "side")
    time.sleep(1.2)  # the receiver's refresh_seconds
    assert "re-queued 4" in shipper_cli("retry", "--config", str(config)).stdout
    second = shipper_cli("once", "--config", str(config))

    assert second.returncode == 3, second.stderr
    assert_index_exactly_once(tmp_path / "data", "lab-1", good | {"unpushed"})
    assert queue_states(tmp_path / "state")["stale-a"] == "fatal"


def test_e2e_receiver_down_then_up(tmp_path: Path, start_receiver: StartReceiver) -> None:
    repo = tmp_path / "repo"
    head = make_repo(repo, commits=2)[0]
    port = free_port()
    config = shipper_config(tmp_path, f"http://127.0.0.1:{port}", concurrency=3)
    expected = {f"ep-{n}" for n in range(6)}
    for episode_id in sorted(expected):
        write_episode(tmp_path / "spool", episode_id, head)
    shipper = ShipperProcess(config).start()
    try:
        wait_for(lambda: shipper.log().count("receiver unavailable") >= 4, 15, "failed attempts")
        assert index_rows(tmp_path / "data") == []
        start_receiver(repo, server={"port": port})
        wait_for(lambda: len(index_rows(tmp_path / "data")) == 6, 20, "all six in the index")
    finally:
        exit_code = shipper.stop()
    assert exit_code == 0
    assert_index_exactly_once(tmp_path / "data", "lab-1", expected)
    assert set(queue_states(tmp_path / "state").values()) == {"shipped"}
    # Probed, not hammered: beyond the first parallel batch, every failed attempt
    # was a lone probe that raised the receiver's failure count by one.
    counts = [int(n) for n in re.findall(r"(\d+) consecutive failure", shipper.log())]
    assert max(counts) >= 3
    assert len(counts) <= max(counts) + 3 - 1, counts


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_e2e_receiver_restarted_mid_upload(
    tmp_path: Path, start_receiver: StartReceiver, how: signal.Signals
) -> None:
    repo = tmp_path / "repo"
    head = make_repo(repo, commits=2)[0]
    receiver = start_receiver(repo)
    expected = {"big-0", "big-1", "big-2"}
    for episode_id in sorted(expected):
        write_episode(tmp_path / "spool", episode_id, head, {"data/raw.bin": os.urandom(16 << 20)})
    config = shipper_config(tmp_path, receiver.url, concurrency=1)
    uploads = tmp_path / "data" / "tmp" / "lab-1"
    shipper = ShipperProcess(config).start()
    try:
        wait_for(lambda: any(uploads.glob("*.part")), 30, "an upload in progress")
        assert receiver.proc is not None
        receiver.proc.send_signal(how)
        receiver.proc.wait(30)
        assert len(index_rows(tmp_path / "data")) < 3
        receiver.start()
        wait_for(lambda: len(index_rows(tmp_path / "data")) == 3, 30, "all three in the index")
    finally:
        exit_code = shipper.stop()
    assert exit_code == 0
    assert_index_exactly_once(tmp_path / "data", "lab-1", expected)
    assert list(uploads.glob("*.part")) == []
    assert set(queue_states(tmp_path / "state").values()) == {"shipped"}
