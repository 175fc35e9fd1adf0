"""[version_gate] remote: each refresh fetches upstream first; a failed fetch keeps the window."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from receiver.errors import UnknownCommit
from receiver.gate import VersionGate
from tests.receiver.test_gate import (
    commit,
    config,
    git,
    hermetic_git,
    make_repo,
    raises,
    run_with_gate,
)

__all__ = ["hermetic_git"]  # the autouse fixture applies here too


def upstream_and_mirror(tmp_path: Path, *clone_args: str) -> tuple[Path, Path, Path]:
    """A bare upstream, a maintainer's clone that pushes to it, the receiver's own clone."""
    work = tmp_path / "maintainer"
    make_repo(work, 3)
    upstream = tmp_path / "upstream.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(upstream))
    git(work, "remote", "add", "origin", str(upstream))
    receiver_checkout = tmp_path / "receiver-checkout"
    git(tmp_path, "clone", "-q", *clone_args, str(upstream), str(receiver_checkout))
    return upstream, work, receiver_checkout


@pytest.mark.parametrize(
    ("clone_args", "ref"), [((), "origin/main"), (("--mirror",), "main")], ids=["clone", "mirror"]
)
def test_a_commit_pushed_upstream_is_accepted_after_one_refresh(
    tmp_path: Path, clone_args: tuple[str, ...], ref: str
) -> None:
    _upstream, work, checkout = upstream_and_mirror(tmp_path, *clone_args)
    cfg = config(checkout, ref=ref, remote="origin", refresh_seconds=0.2)

    async def scenario(gate: VersionGate) -> None:
        pushed = commit(work, "fix")
        git(work, "push", "-q", "origin", "main")
        for _ in range(50):  # a few refresh intervals at most
            if gate.position(pushed) == 0:
                break
            await asyncio.sleep(0.1)
        verdict = await gate.check(pushed)
        assert verdict.behind_by == 0
        assert gate.state()["refresh_failures"] == 0

    run_with_gate(cfg, scenario)


def test_a_failing_fetch_keeps_the_window_and_is_counted(tmp_path: Path) -> None:
    upstream, work, checkout = upstream_and_mirror(tmp_path)
    head = git(checkout, "rev-parse", "origin/main")
    cfg = config(checkout, ref="origin/main", remote="origin", refresh_seconds=0.1)

    async def scenario(gate: VersionGate) -> None:
        shutil.rmtree(upstream)  # the upstream went away (network, a moved repository)
        for _ in range(50):
            if int(str(gate.state()["refresh_failures"])) >= 2:
                break
            await asyncio.sleep(0.1)
        state = gate.state()
        assert int(str(state["refresh_failures"])) >= 2
        assert "git fetch origin exited" in str(state["last_error"])
        assert (await gate.check(head)).behind_by == 0  # the window is kept
        unpushed = commit(work, "never pushed")
        assert isinstance(await raises(gate.check(unpushed)), UnknownCommit)

    run_with_gate(cfg, scenario)
