"""The verdict → action table (shipper.actions) and what a few actions do (shipper.effects)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shipper.actions import BY_VERDICT, Action, action_for, receiver_answered
from shipper.async_queue import AsyncQueue
from shipper.backoff import ReceiverHealth
from shipper.config import ShipperConfig
from shipper.effects import Effects
from shipper.outcome import Outcome, Verdict
from shipper.queue import Queue
from shipper.spool import Kind
from shipper.states import Episode, State
from tests.shipper.conftest import GOOD, make_config

SHA = "f" * 64


@pytest.mark.parametrize(
    ("verdict", "action"),
    [
        (Verdict.RETRY_RECEIVER, Action.BACK_OFF_RECEIVER),
        (Verdict.HELD, Action.HOLD),
        (Verdict.SHIPPED, Action.SHIP),
        (Verdict.STALE, Action.PARK_COMMIT),
        (Verdict.DIGEST_MISMATCH, Action.REHASH),
        (Verdict.FATAL, Action.FATAL),
        (Verdict.RETRY_EPISODE, Action.RETRY_EPISODE),
        (Verdict.PROCEED, Action.RETRY_EPISODE),  # a final answer was due and none came
    ],
)
def test_each_verdict_has_one_action(verdict: Verdict, action: Action) -> None:
    assert action_for(verdict, digest_retries=0, digest_mismatch_attempts=2) is action


def test_the_table_covers_every_verdict() -> None:
    assert set(BY_VERDICT) == set(Verdict)


def test_a_digest_mismatch_rehashes_only_as_often_as_configured() -> None:
    assert action_for(Verdict.DIGEST_MISMATCH, 0, 2) is Action.REHASH
    assert action_for(Verdict.DIGEST_MISMATCH, 1, 2) is Action.REHASH
    assert action_for(Verdict.DIGEST_MISMATCH, 2, 2) is Action.FATAL_AFTER_REHASH
    assert action_for(Verdict.DIGEST_MISMATCH, 0, 0) is Action.FATAL_AFTER_REHASH
    assert action_for(Verdict.FATAL, 5, 2) is Action.FATAL  # only mismatches count retries


def test_only_back_off_and_hold_do_not_count_as_the_receiver_answering() -> None:
    unwell = {action for action in Action if not receiver_answered(action)}
    assert unwell == {Action.BACK_OFF_RECEIVER, Action.HOLD}


def packed_episode(config: ShipperConfig, queue: Queue) -> Episode:
    """A directory episode packed into packed_dir, waiting to be uploaded."""
    config.packed_dir.mkdir(parents=True, exist_ok=True)
    packed = config.packed_dir / "ep-1.tar.zst"
    packed.write_bytes(b"x" * 10)
    queue.add("ep-1", config.spool_dir / "ep-1", Kind.DIRECTORY)
    queue.start_packing("ep-1")
    queue.set_commit("ep-1", GOOD)
    queue.finish_packing("ep-1", packed, SHA, 10)
    queue.start_upload("ep-1")
    episode = queue.get("ep-1")
    assert episode is not None
    return episode


def apply(tmp_path: Path, outcome: Outcome) -> tuple[Episode, ReceiverHealth, Path]:
    """Carry out outcome for a packed episode; the episode after it, the health, the copy."""
    config = make_config(tmp_path)
    queue = Queue.open(config.state_dir)
    episode = packed_episode(config, queue)
    health = ReceiverHealth(1.0, 10.0)

    async def go() -> None:
        async_queue = AsyncQueue(queue)
        effects = Effects(config, async_queue, health)
        assert set(effects.handlers) == set(Action)
        await effects.apply(episode, outcome, health.start())
        await async_queue.aclose()

    try:
        asyncio.run(go())
        after = queue.get("ep-1")
    finally:
        queue.close()
    assert after is not None and episode.packed_path is not None
    return after, health, episode.packed_path


def test_fatal_parks_the_episode_and_drops_our_packed_copy(tmp_path: Path) -> None:
    after, health, packed = apply(tmp_path, Outcome(Verdict.FATAL, "HTTP 413"))
    assert after.state is State.FATAL and after.last_error == "HTTP 413"
    assert not packed.exists() and health.healthy


def test_rehash_forgets_the_hash_and_the_copy(tmp_path: Path) -> None:
    after, _health, packed = apply(tmp_path, Outcome(Verdict.DIGEST_MISMATCH, "differs"))
    assert after.state is State.PENDING and after.sha256 is None and after.digest_retries == 1
    assert not packed.exists()


def test_back_off_counts_a_receiver_failure_and_keeps_the_copy(tmp_path: Path) -> None:
    after, health, packed = apply(tmp_path, Outcome(Verdict.RETRY_RECEIVER, "HTTP 503"))
    assert after.state is State.RETRY_WAIT and after.attempts == 1
    assert health.failures == 1 and not health.healthy and packed.exists()
