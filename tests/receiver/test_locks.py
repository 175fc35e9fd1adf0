"""receiver.storage.episode_locks: per-episode locks that hold within and across processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.storage.episode_locks import EpisodeLocks
from tests.support import PROJECT_ROOT

HOLDER = """
import sys, time
from pathlib import Path
from receiver.storage.episode_locks import EpisodeLocks
locks = EpisodeLocks(Path(sys.argv[1]))
assert locks.try_acquire("lab-07", "ep-1")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def locks(tmp_path: Path) -> Iterator[EpisodeLocks]:
    instance = EpisodeLocks(tmp_path / "episodes.lock")
    yield instance
    instance.close()


def test_same_key_twice_is_refused_until_released(locks: EpisodeLocks) -> None:
    assert locks.try_acquire("lab-07", "ep-1") is True
    assert locks.try_acquire("lab-07", "ep-1") is False
    locks.release("lab-07", "ep-1")
    assert locks.try_acquire("lab-07", "ep-1") is True


def test_different_keys_are_independent(locks: EpisodeLocks) -> None:
    assert locks.try_acquire("lab-07", "ep-1") is True
    assert locks.try_acquire("lab-07", "ep-2") is True
    assert locks.try_acquire("lab-08", "ep-1") is True
    locks.release("lab-07", "ep-2")
    assert locks.try_acquire("lab-07", "ep-1") is False
    assert locks.try_acquire("lab-08", "ep-1") is False
    assert locks.try_acquire("lab-07", "ep-2") is True


def test_releasing_a_key_that_is_not_held_is_harmless(locks: EpisodeLocks) -> None:
    locks.release("lab-07", "ep-1")
    assert locks.try_acquire("lab-07", "ep-1") is True


def test_a_key_held_by_another_process_is_refused_until_that_process_dies(
    tmp_path: Path, locks: EpisodeLocks
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "episodes.lock")],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert locks.try_acquire("lab-07", "ep-1") is False
        assert locks.try_acquire("lab-07", "ep-2") is True  # only that key is taken
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert locks.try_acquire("lab-07", "ep-1") is True  # the kernel released it
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
