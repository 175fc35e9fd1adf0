"""A model-based test: random sequences against a real receiver, checked after every step.

Hypothesis drives uploads (few hosts and ids, so they collide), retries, conflicting
uploads, crashes at failpoints (the receiver restarted with a failpoint for one
request, then clean; sometimes episode-backfill runs while it is down), clean and
kill -9 restarts, and backfills beside the live receiver. The model is the set of
acknowledged episodes and their sha256; after every step the data_dir must hold
exactly those, each indexed once, with no temp file and no torn index tail; at the
end of each example episode-verify finds nothing wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from receiver import failpoints
from tests.reliability.conftest import Receiver, episode, sha256
from tests.reliability.invariants import Key, check_invariants, read_state
from tests.support import head_commits, make_repo

BIN = Path(sys.executable).parent
HOSTS = st.sampled_from(["a", "b"])
EPISODES = st.sampled_from(["e1", "e2", "e3"])
VARIANTS = st.integers(min_value=0, max_value=1)  # two contents per id: retries and conflicts


@dataclass
class World:
    """What every example of one run shares: the gate repository and the step counts."""

    tmp: Path
    repo: Path
    commit: str
    examples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # Restarts cost ~0.5 s each: the bounded run allows few per example, the soak more.
    max_crashes: int = 1
    max_restarts: int = 1
    max_view_losses: int = 1

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("model")
    make_repo(tmp / "repo", commits=2)
    instance = World(tmp, tmp / "repo", head_commits(tmp / "repo", 1)[0])
    yield instance
    print(f"model: {instance.examples} examples, steps: {instance.counts}")


def body_of(episode_id: str, variant: int, commit: str) -> bytes:
    return episode(commit, size=1024, seed=zlib.crc32(f"{episode_id}/{variant}".encode()))


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=60, check=False
    )


def model_machine(world: World) -> type[RuleBasedStateMachine]:
    class ReceiverModel(RuleBasedStateMachine):
        """One example: a fresh data_dir and receiver, so a failure replays the same way."""

        def __init__(self) -> None:
            super().__init__()
            world.examples += 1
            example = world.tmp / f"example-{world.examples}"
            example.mkdir()
            self.receiver = Receiver(example, world.repo).start()
            self.data = self.receiver.data_dir
            self.acked: dict[Key, str] = {}  # the model: acknowledged episodes and their sha256
            self.crashes = 0
            self.restarts = 0
            self.view_losses = 0

        def expected(self, key: Key, sha: str) -> int:
            if key not in self.acked:
                return 201
            return 200 if self.acked[key] == sha else 409

        # -- rules --------------------------------------------------------------------

        @rule(host=HOSTS, episode_id=EPISODES, variant=VARIANTS)
        def upload(self, host: str, episode_id: str, variant: int) -> None:
            """A first upload, a retry or a conflict, whichever the model says it is."""
            key = (host, episode_id)
            body = body_of(episode_id, variant, world.commit)
            expect = self.expected(key, sha256(body))
            world.count({201: "stored", 200: "retry", 409: "conflict"}[expect])
            response = self.receiver.put(*key, body, world.commit)
            assert response.status_code == expect, response.text
            if expect == 409:
                assert response.json()["stored_sha256"] == self.acked[key]
            else:
                assert response.json()["sha256"] == sha256(body)
                self.acked[key] = sha256(body)

        @precondition(lambda self: self.crashes < world.max_crashes)
        @rule(
            point=st.sampled_from(failpoints.POINTS),
            host=HOSTS,
            episode_id=EPISODES,
            variant=VARIANTS,
            backfill_while_down=st.booleans(),
        )
        def crash(
            self, point: str, host: str, episode_id: str, variant: int, backfill_while_down: bool
        ) -> None:
            """Restart with a failpoint, upload; the process dies unless the id is stored."""
            world.count(f"crash:{point}")
            self.crashes += 1
            key = (host, episode_id)
            body = body_of(episode_id, variant, world.commit)
            self.receiver.kill()
            self.receiver.start(failpoints=point)
            if key in self.acked:  # answered by content: no write, no failpoint
                expect = self.expected(key, sha256(body))
                assert self.receiver.put(*key, body, world.commit).status_code == expect
            else:
                with pytest.raises(httpx.TransportError):
                    self.receiver.put(*key, body, world.commit)
                assert self.receiver.wait_dead() == -signal.SIGKILL, self.receiver.log()
                if backfill_while_down:
                    world.count("backfill-while-down")
                    self.backfill()
            self.receiver.kill()
            self.receiver.start()
            # The crashed upload is stored whole (and now indexed) or not at all.
            stored = read_state(self.data).files.get(key)
            if key not in self.acked and stored is not None:
                assert stored == sha256(body)
                self.acked[key] = stored

        @rule()
        def backfill(self) -> None:
            """Beside a live receiver (or a dead one): nothing to add once recovery ran."""
            result = run_tool("episode-backfill", "--config", str(self.receiver.config_path))
            assert result.returncode == 0, result.stdout + result.stderr

        @precondition(lambda self: self.restarts < world.max_restarts)
        @rule(hard=st.booleans())
        def restart(self, hard: bool) -> None:
            world.count("kill-9" if hard else "restart")
            self.restarts += 1
            if hard:
                self.receiver.kill()
            self.receiver.start()

        @precondition(lambda self: self.view_losses < world.max_view_losses)
        @rule(how=st.sampled_from(["deleted", "truncated", "garbage"]), hard=st.booleans())
        def lose_view(self, how: str, hard: bool) -> None:
            """The index's view is only derived: losing it between starts loses nothing."""
            world.count(f"view-{how}")
            self.view_losses += 1
            if hard:
                self.receiver.kill()
            else:
                self.receiver.stop()
            view = self.data / "index.view.sqlite3"
            for leftover in (Path(f"{view}-wal"), Path(f"{view}-shm")):
                leftover.unlink(missing_ok=True)
            if how == "deleted":
                view.unlink(missing_ok=True)
            elif how == "truncated" and view.exists():
                os.truncate(view, view.stat().st_size // 2)
            else:
                view.write_bytes(zlib.compress(view.read_bytes() if view.exists() else b"x"))
            self.receiver.start()

        # -- the promise, after every step --------------------------------------------------

        @invariant()
        def promise_holds(self) -> None:
            check_invariants(self.data, self.acked)

        @invariant()
        def lookups_match_the_model(self) -> None:
            url = self.receiver.url
            for host in ("a", "b"):
                for episode_id in ("e1", "e2", "e3"):
                    answer = httpx.head(f"{url}/episodes/{host}/{episode_id}", timeout=10)
                    expect = 200 if (host, episode_id) in self.acked else 404
                    assert answer.status_code == expect, (host, episode_id)
            rows = httpx.get(f"{url}/healthz", timeout=10).json()["index_rows"]
            assert rows == len(self.acked)

        def teardown(self) -> None:
            try:
                result = run_tool("episode-verify", "--data-dir", str(self.data))
                assert result.returncode == 0, result.stdout + result.stderr
            finally:
                self.receiver.kill()

    return ReceiverModel


def run_model(world: World, examples: int, steps: int) -> None:
    run_state_machine_as_test(
        model_machine(world),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.timeout(180)
def test_model_receiver_keeps_the_promise(world: World) -> None:
    run_model(world, examples=10, steps=12)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_model_receiver_keeps_the_promise_soak(world: World) -> None:
    world.max_crashes, world.max_restarts = 6, 6
    run_model(world, examples=100, steps=30)
