"""The shipper SIGKILLed at random moments, again and again, against a real receiver.

After the loop the index holds every good episode exactly once, every fatal
episode is still on disk, and nothing half-done is left behind.
"""

from __future__ import annotations

import os
import random
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
)
from tests.support import make_repo


def _episode_files(rng: random.Random) -> dict[str, bytes]:
    """Mixed sizes, some incompressible, some very compressible."""
    return {
        "data/camera.bin": os.urandom(rng.randint(2, 8) << 20),
        "data/joints.csv": b"0.125,0.250,0.500\n" * rng.randint(1000, 200_000),
    }


def crash_loop(
    tmp_path: Path,
    start_receiver: StartReceiver,
    *,
    good: int,
    rounds: int,
    min_kills: int,
    budget_seconds: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    repo = tmp_path / "repo"
    commits = make_repo(repo, commits=8)  # window 5: commits[5:] are stale
    receiver = start_receiver(repo)
    spool = tmp_path / "spool"
    spool.mkdir()
    expected = {f"ep-{n:03d}" for n in range(good)}
    for episode_id in sorted(expected):
        write_episode(spool, episode_id, rng.choice(commits[:5]), _episode_files(rng))
    write_tarball(spool, "ready-1", commits[0])
    expected.add("ready-1")
    fatal = {"stale-1", "stale-2", "no-commit"}
    write_episode(spool, "stale-1", commits[6], _episode_files(rng))
    write_episode(spool, "stale-2", commits[6])
    write_episode(spool, "no-commit", None)
    config = shipper_config(tmp_path, receiver.url, retention={"delete_after_days": 0})
    shipper = ShipperProcess(config)

    kills = 0
    give_up_at = time.monotonic() + budget_seconds
    for round_ in range(rounds):
        if time.monotonic() > give_up_at:
            break  # the final `once` below finishes whatever is left
        states = queue_states(tmp_path / "state")
        all_shipped = all(states.get(e) == "shipped" for e in expected)
        if all_shipped and not any(spool.glob("ep-*")) and kills >= min_kills:
            break
        starts = shipper.log().count(" run: host ")
        shipper.start()
        if round_ % 2 == 0 and not all_shipped:
            # Aim at the moments that matter: a pack or an upload under way in this
            # process (the states a previous kill left are reset right after start-up).
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and shipper.log().count(" run: host ") == starts:
                time.sleep(0.005)
            time.sleep(0.02)
            while time.monotonic() < deadline and not (
                {"packing", "uploading"} & set(queue_states(tmp_path / "state").values())
            ):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.01))
        else:
            # Anywhere: start-up (~0.3 s), packing, uploads, deletions, idle.
            time.sleep(rng.uniform(0.05, 1.0))
        shipper.kill()
        kills += 1
    resumed = shipper.log().count("interrupted by a crash")
    print(
        f"{kills} kills, {resumed} resumed mid-work; {len(index_rows(tmp_path / 'data'))} shipped"
    )

    assert resumed >= 1, "kills are meant to interrupt packs and uploads"
    final = shipper_cli("once", "--config", str(config))
    assert final.returncode == 3, f"seed {seed}, {kills} kills\n{final.stderr}"
    assert_index_exactly_once(tmp_path / "data", "lab-1", expected)
    states = queue_states(tmp_path / "state")
    assert {e: states[e] for e in expected} == dict.fromkeys(expected, "shipped")
    assert {e: states[e] for e in fatal} == dict.fromkeys(fatal, "fatal")
    # Fatal episodes are parked on disk; shipped ones were deleted (retention 0 days).
    assert sorted(p.name for p in spool.iterdir()) == sorted(fatal)
    assert all((spool / e / "meta.json").exists() for e in fatal)
    assert list((tmp_path / "state" / "packed").iterdir()) == []
    assert not any(r["episode_id"] in fatal for r in index_rows(tmp_path / "data"))


def test_e2e_shipper_killed_at_random_moments_ships_everything_once(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    seed = int(os.environ.get("SHIPPER_CRASH_SEED", time.time_ns() % 100_000))
    print(f"crash loop seed {seed} (SHIPPER_CRASH_SEED reproduces it)")
    crash_loop(
        tmp_path, start_receiver, good=12, rounds=40, min_kills=10, budget_seconds=8, seed=seed
    )


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_e2e_soak_shipper_killed_hundreds_of_times(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    seed = int(os.environ.get("SHIPPER_CRASH_SEED", time.time_ns() % 100_000))
    print(f"crash loop seed {seed} (SHIPPER_CRASH_SEED reproduces it)")
    crash_loop(
        tmp_path, start_receiver, good=40, rounds=400, min_kills=150, budget_seconds=600, seed=seed
    )
