"""The durable queue: transitions, fan-out of refused commits, recovery, kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shipper import states
from shipper.queue import Queue
from shipper.spool import Kind
from shipper.states import State
from tests.shipper.conftest import GOOD, OLD


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return Queue.open(tmp_path / "state")


def add_prepared(queue: Queue, episode_id: str, commit: str = GOOD) -> None:
    assert queue.add(episode_id, Path("/spool") / episode_id, Kind.DIRECTORY)
    assert queue.start_packing(episode_id)
    assert queue.set_commit(episode_id, commit)
    assert queue.finish_packing(episode_id, Path(f"/packed/{episode_id}.tar.zst"), "f" * 64, 10)


def test_the_database_runs_in_wal_mode_with_full_sync(queue: Queue) -> None:
    assert queue.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_adding_an_episode_twice_keeps_the_first(queue: Queue) -> None:
    assert queue.add("ep-1", Path("/spool/ep-1"), Kind.DIRECTORY)
    assert not queue.add("ep-1", Path("/spool/ep-1.tar.zst"), Kind.TARBALL)
    episode = queue.get("ep-1")
    assert episode is not None and episode.kind is Kind.DIRECTORY
    assert episode.state is State.PENDING and set(queue.known_sources()) == {"ep-1"}


def test_an_episode_added_with_an_error_is_fatal_with_that_reason(queue: Queue) -> None:
    queue.add("bad id", Path("/spool/bad id"), Kind.DIRECTORY, error="invalid episode id")
    episode = queue.get("bad id")
    assert episode is not None and episode.state is State.FATAL
    assert episode.last_error == "invalid episode id"


def test_state_survives_closing_and_reopening(tmp_path: Path) -> None:
    queue = Queue.open(tmp_path / "state")
    add_prepared(queue, "ep-1")
    queue.retry_later("ep-1", "HTTP 503", 12345.0)
    queue.close()
    reopened = Queue.open(tmp_path / "state")
    episode = reopened.get("ep-1")
    assert episode is not None
    assert (episode.state, episode.attempts, episode.next_attempt_at) == (
        State.RETRY_WAIT,
        1,
        12345.0,
    )
    assert episode.sha256 == "f" * 64 and episode.commit == GOOD


def test_recover_restarts_work_that_was_in_progress(queue: Queue) -> None:
    add_prepared(queue, "ep-1")
    queue.start_upload("ep-1")
    queue.add("ep-2", Path("/spool/ep-2"), Kind.DIRECTORY)
    queue.start_packing("ep-2")
    assert queue.recover() == 2
    first, second = queue.get("ep-1"), queue.get("ep-2")
    assert first is not None and second is not None
    assert first.state is State.PENDING and first.sha256 == "f" * 64
    assert second.state is State.PENDING and second.sha256 is None
    assert first.attempts == 0


def test_transitions_only_happen_from_their_expected_states(queue: Queue) -> None:
    queue.add("ep-1", Path("/spool/ep-1"), Kind.DIRECTORY)
    assert not queue.finish_packing("ep-1", Path("/p"), "f" * 64, 1)
    add_prepared(queue, "ep-2")
    assert queue.shipped("ep-2")
    assert not queue.fatal("ep-2", "late 412")
    assert not queue.start_upload("ep-2")
    episode = queue.get("ep-2")
    assert episode is not None and episode.state is State.SHIPPED


def test_next_to_upload_takes_the_oldest_due_prepared_episode(queue: Queue) -> None:
    add_prepared(queue, "ep-1")
    add_prepared(queue, "ep-2")
    queue.add("ep-3", Path("/spool/ep-3"), Kind.DIRECTORY)
    queue.retry_later("ep-1", "HTTP 503", time.time() + 60)
    chosen = queue.next_to_upload(time.time())
    assert chosen is not None and chosen.episode_id == "ep-2"
    assert queue.next_to_upload(time.time(), exclude={"ep-2"}) is None
    prepare = queue.next_to_prepare(time.time())
    assert prepare is not None and prepare.episode_id == "ep-3"
    due = queue.next_due_at()
    assert due is not None and due > time.time()
    assert queue.make_due_now() == 1
    assert queue.next_due_at() == 0.0


def test_refusing_a_commit_parks_every_waiting_episode_of_it(queue: Queue) -> None:
    for episode_id, commit in [("ep-1", OLD), ("ep-2", OLD), ("ep-3", GOOD), ("ep-4", OLD)]:
        add_prepared(queue, episode_id, commit)
    queue.shipped("ep-4")
    new, parked = queue.refuse_commit(OLD, "HTTP 412 stale-commit", "git pull\n")
    assert new and sorted(parked) == ["ep-1", "ep-2"]
    states = {e: queue.get(e).state for e in ("ep-1", "ep-2", "ep-3", "ep-4")}  # type: ignore[union-attr]
    assert states == {
        "ep-1": State.FATAL,
        "ep-2": State.FATAL,
        "ep-3": State.PENDING,
        "ep-4": State.SHIPPED,
    }
    parked_episode = queue.get("ep-1")
    assert parked_episode is not None and parked_episode.remediation == "git pull\n"
    again, _ = queue.refuse_commit(OLD, "HTTP 412 stale-commit", "git pull\n")
    assert not again
    refusal = queue.refusal(OLD)
    assert refusal is not None and refusal.remediation == "git pull\n"


def test_retry_requeues_fatal_episodes_and_forgets_refusals(queue: Queue) -> None:
    add_prepared(queue, "ep-1", OLD)
    queue.refuse_commit(OLD, "HTTP 412 stale-commit", "git pull\n")
    queue.add("ep-2", Path("/spool/ep-2"), Kind.DIRECTORY, error="meta.json: not valid JSON")
    assert len(queue.retry_fatal()) == 2
    assert queue.refusal(OLD) is None and queue.refusals() == []
    for episode_id in ("ep-1", "ep-2"):
        episode = queue.get(episode_id)
        assert episode is not None and episode.state is State.PENDING
        assert episode.attempts == 0 and episode.last_error is None and episode.remediation is None


def test_digest_mismatch_forgets_the_hash_and_counts(queue: Queue) -> None:
    add_prepared(queue, "ep-1")
    queue.start_upload("ep-1")
    assert queue.digest_mismatch("ep-1", "HTTP 400 digest-mismatch")
    episode = queue.get("ep-1")
    assert episode is not None
    assert (episode.state, episode.sha256, episode.digest_retries) == (State.PENDING, None, 1)


def test_retention_sees_only_shipped_episodes_past_the_cutoff(queue: Queue) -> None:
    add_prepared(queue, "ep-1")
    add_prepared(queue, "ep-2")
    queue.shipped("ep-1")
    queue.fatal("ep-2", "HTTP 409 conflict")
    assert [e.episode_id for e in queue.due_for_deletion(time.time() + 1)] == ["ep-1"]
    assert queue.due_for_deletion(time.time() - 3600) == []
    queue.local_deleted("ep-1")
    assert queue.due_for_deletion(time.time() + 1) == []


CHILD = """
import sys
from pathlib import Path
from shipper.queue import Queue
from shipper.spool import Kind
queue = Queue.open(Path(sys.argv[1]))
for n in range(100000):
    episode_id = f"ep-{n}"
    queue.add(episode_id, Path("/spool") / episode_id, Kind.DIRECTORY)
    queue.start_packing(episode_id)
    print(episode_id, flush=True)
"""


def test_every_acknowledged_change_survives_kill_9(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert child.stdout is not None
        acknowledged = [child.stdout.readline().strip() for _ in range(20 + 10 * round_)]
        child.send_signal(signal.SIGKILL)
        child.wait()
        queue = Queue.open(state)
        assert queue.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        known = set(queue.known_sources())
        assert set(acknowledged) <= known
        for episode_id in acknowledged:
            episode = queue.get(episode_id)
            assert episode is not None and episode.state is State.PACKING
        assert queue.recover() >= len(acknowledged)
        queue.close()


def test_a_version_1_queue_is_upgraded_in_place(tmp_path: Path) -> None:
    old_schema = states.SCHEMA.replace(",\n    manifest TEXT,\n    changed_files TEXT", "")
    conn = states.connect(tmp_path / "queue.db")
    conn.executescript(f"{old_schema}; PRAGMA user_version = 1;")
    conn.execute(
        "INSERT INTO episodes (episode_id, source, kind, state, discovered_at, updated_at)"
        " VALUES ('ep-1', '/spool/ep-1', 'dir', 'shipped', 0, 0)"
    )
    queue = Queue(conn)
    episode = queue.get("ep-1")
    assert episode is not None and episode.manifest is None and episode.changed_files is None
    assert conn.execute("PRAGMA user_version").fetchone()[0] == states.SCHEMA_VERSION
    queue.close()
