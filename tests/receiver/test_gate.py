"""The version gate against real git repositories made in tmp_path."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from receiver.config import GateConfig
from receiver.errors import (
    GateNotReady,
    IngestError,
    MalformedCommit,
    MissingCommit,
    StaleCommit,
    UnknownCommit,
)
from receiver.gate import VersionGate, warning_threshold
from tests.support import give_to_another_user

REAL_GIT = shutil.which("git") or "git"
REMEDIATION = "# update, then:\ncd ~/code && git pull --ff-only\necho 'quotes \" and $HOME stay'\n"
REMEDIATION_UNKNOWN = "# push it, or:\ngit -C ~/code checkout main\n"
NOT_IN_ANY_REPO = "0123456789abcdef" * 2 + "01234567"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


@pytest.fixture(autouse=True)
def hermetic_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The gate inherits this environment: no user config, and no repository found above tmp_path.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        [REAL_GIT, "-C", str(repo), *args],
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def commit(repo: Path, message: str = "c") -> str:
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def make_repo(path: Path, commits: int, *init_args: str) -> list[str]:
    """A repository with `commits` empty commits on main; ids oldest first."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main", *init_args)
    return [commit(path, f"c{i}") for i in range(commits)]


def config(repo: Path | None, **overrides: Any) -> GateConfig:
    values: dict[str, Any] = {
        "repo_path": repo,
        "window": 5,
        "refresh_seconds": 3600.0,
        "git_timeout_seconds": 5.0,
        "remediation": REMEDIATION,
        "remediation_unknown": REMEDIATION_UNKNOWN,
    }
    return GateConfig(**(values | overrides))


def run_with_gate(
    cfg: GateConfig,
    scenario: Callable[[VersionGate], Awaitable[None]],
    min_forced_refresh_seconds: float = 1.0,
) -> VersionGate:
    async def main() -> VersionGate:
        gate = VersionGate(cfg, min_forced_refresh_seconds=min_forced_refresh_seconds)
        await gate.start()
        try:
            await scenario(gate)
        finally:
            await gate.close()
        return gate

    return asyncio.run(main())


async def raises(coro: Awaitable[object]) -> IngestError:
    try:
        await coro
    except IngestError as error:
        return error
    raise AssertionError("expected an IngestError")


def install_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A `git` first on PATH that logs each call; while tmp_path/hang exists it hangs, and
    while tmp_path/garbage exists `git log` prints garbage and succeeds."""
    bin_dir, calls, hang = tmp_path / "bin", tmp_path / "git-calls", tmp_path / "hang"
    bin_dir.mkdir()
    shim = bin_dir / "git"
    shim.write_text(
        "#!/bin/sh\n"
        f'echo "$(date +%s.%N) $*" >> "{calls}"\n'
        f'if [ -e "{hang}" ]; then\n'
        # The sleep is a grandchild, so only a kill of the whole process group ends it.
        f'  echo $$ >> "{tmp_path}/pids"; sleep 30 & echo $! >> "{tmp_path}/pids"; wait\n'
        "fi\n"
        f'if [ -e "{tmp_path}/garbage" ] && [ "$3" = log ]; then\n'
        '  echo "warning: not an id"; exit 0\n'
        "fi\n"
        f'exec "{REAL_GIT}" "$@"\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    calls.touch()
    return calls, hang


def git_runs(calls: Path, subcommand: str) -> list[float]:
    """When the gate ran `git -C <repo> <subcommand>` (wall-clock seconds)."""
    runs = [line.split() for line in calls.read_text().splitlines()]
    return [float(run[0]) for run in runs if run[3:4] == [subcommand]]


def git_calls(calls: Path, subcommand: str) -> int:
    return len(git_runs(calls, subcommand))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def failures(gate: VersionGate) -> int:
    count = gate.state()["refresh_failures"]
    assert isinstance(count, int)
    return count


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_window_loads_and_behind_by_is_the_position_from_head(tmp_path: Path) -> None:
    commits = make_repo(tmp_path / "repo", 4)

    async def scenario(gate: VersionGate) -> None:
        for behind_by, c in enumerate(reversed(commits)):
            verdict = await gate.check(c)
            assert (verdict.commit, verdict.behind_by) == (c, behind_by)
            assert verdict.head_commit == commits[-1]
            assert verdict.window == 5

    run_with_gate(config(tmp_path / "repo"), scenario)


def test_commit_ids_are_compared_and_returned_in_lower_case(tmp_path: Path) -> None:
    commits = make_repo(tmp_path / "repo", 2)

    async def scenario(gate: VersionGate) -> None:
        verdict = await gate.check(f" {commits[0].upper()} ")
        assert verdict.commit == commits[0]
        assert verdict.behind_by == 1

    run_with_gate(config(tmp_path / "repo"), scenario)


def test_sha256_repositories_are_supported(tmp_path: Path) -> None:
    try:
        commits = make_repo(tmp_path / "repo", 2, "--object-format=sha256")
    except subprocess.CalledProcessError:
        pytest.skip("this git cannot create SHA-256 repositories")
    assert len(commits[-1]) == 64

    async def scenario(gate: VersionGate) -> None:
        assert (await gate.check(commits[-1].upper())).behind_by == 0
        assert (await gate.check(commits[0])).behind_by == 1

    run_with_gate(config(tmp_path / "repo"), scenario)


def test_parse_header_accepts_40_and_64_hex_in_any_case() -> None:
    gate = VersionGate(config(None))
    assert gate.parse_header("AbCdEf0123" * 4) == "abcdef0123" * 4
    assert gate.parse_header("ABCDEF01" * 8) == "abcdef01" * 8
    assert gate.header_name == "X-Code-Commit"


@pytest.mark.parametrize(
    "value", ["a" * 39, "a" * 41, "a" * 63, "a" * 65, "g" * 40, "HEAD", "main", "a" * 20 + " " * 20]
)
def test_parse_header_rejects_malformed_ids_with_remediation(value: str) -> None:
    with pytest.raises(MalformedCommit) as caught:
        VersionGate(config(None)).parse_header(value)
    assert caught.value.status_code == 400
    assert caught.value.body()["error"] == "malformed-commit"
    assert caught.value.body()["remediation"] == REMEDIATION


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_header_is_400_with_remediation_verbatim(value: str | None) -> None:
    with pytest.raises(MissingCommit) as caught:
        VersionGate(config(None)).parse_header(value)
    assert caught.value.status_code == 400
    assert caught.value.body()["error"] == "missing-commit"
    assert caught.value.fields == {"remediation": REMEDIATION}


def test_gate_off_accepts_anything_and_still_normalises_well_formed_ids() -> None:
    gate = VersionGate(config(None, enabled=False))
    assert gate.parse_header(None) is None
    assert gate.parse_header("not-a-commit") is None
    assert gate.parse_header("ABCDEF0123" * 4) == "abcdef0123" * 4

    async def scenario(gate: VersionGate) -> None:
        verdict = await gate.check(NOT_IN_ANY_REPO.upper())
        assert (verdict.commit, verdict.behind_by, verdict.warning) == (NOT_IN_ANY_REPO, None, None)
        assert (await gate.check(None)).commit is None
        assert (await gate.check("garbage")).commit is None
        assert gate.state()["enabled"] is False

    run_with_gate(config(None, enabled=False), scenario)


def test_never_loaded_gate_answers_503_with_retry_after_and_never_412(tmp_path: Path) -> None:
    not_a_repo = tmp_path / "not-a-repo"
    not_a_repo.mkdir()

    async def scenario(gate: VersionGate) -> None:
        for candidate in (NOT_IN_ANY_REPO, "ab" * 32):
            error = await raises(gate.check(candidate))
            assert isinstance(error, GateNotReady)
            assert error.status_code == 503
            assert error.headers == {"Retry-After": "5"}
        state = gate.state()
        assert state["loaded"] is False and state["head_commit"] is None
        assert state["refresh_failures"] == 1
        assert "not a git repository" in str(state["last_error"])

    run_with_gate(config(not_a_repo, refresh_seconds=4.2), scenario, min_forced_refresh_seconds=0)


def test_commit_made_after_start_is_accepted_without_waiting_for_refresh(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    commits = make_repo(repo, 3)

    async def scenario(gate: VersionGate) -> None:
        new = commit(repo, "pushed a moment ago")
        verdict = await gate.check(new)
        assert (verdict.behind_by, verdict.head_commit) == (0, new)
        assert (await gate.check(commits[-1])).behind_by == 1

    run_with_gate(config(repo, refresh_seconds=3600.0), scenario)


def test_burst_of_unknown_commits_runs_at_most_one_git_log_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_repo(tmp_path / "repo", 3)
    calls, _ = install_shim(tmp_path, monkeypatch)
    unknown = [f"{i:040x}" for i in range(1, 51)]

    async def scenario(gate: VersionGate) -> None:
        calls.write_text("")
        errors = await asyncio.gather(*(raises(gate.check(c)) for c in unknown))
        assert all(isinstance(e, UnknownCommit) for e in errors)
        assert git_calls(calls, "log") == 1
        # Another burst at once: it waits for one more refresh (not refused unseen, not fifty),
        # started no sooner than the interval after the first.
        errors = await asyncio.gather(*(raises(gate.check(unknown[0])) for _ in range(50)))
        assert all(isinstance(e, UnknownCommit) for e in errors)
        first, second = git_runs(calls, "log")
        assert second - first >= 0.5 - 0.02  # date(1) is run a moment after git starts
        assert gate.state()["refreshes"] == 3  # start + one per burst

    run_with_gate(config(tmp_path / "repo"), scenario, min_forced_refresh_seconds=0.5)


def test_stale_and_unknown_commits_are_told_apart_with_contract_fields(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    commits = make_repo(repo, 8)
    git(repo, "checkout", "-q", "-b", "side", commits[2])
    side = commit(repo, "on another branch")
    git(repo, "checkout", "-q", "main")
    head = commits[-1]

    async def scenario(gate: VersionGate) -> None:
        stale = await raises(gate.check(commits[0]))
        assert isinstance(stale, StaleCommit) and stale.status_code == 412
        assert stale.body() | {"detail": None} == {
            "error": "stale-commit",
            "detail": None,
            "your_commit": commits[0],
            "head_commit": head,
            "window": 3,
            "behind_by": 7,
            "remediation": REMEDIATION,
        }
        just_outside = await raises(gate.check(commits[4]))
        assert isinstance(just_outside, StaleCommit) and just_outside.fields["behind_by"] == 3
        assert (await gate.check(commits[5])).behind_by == 2
        for candidate in (side, NOT_IN_ANY_REPO):
            unknown = await raises(gate.check(candidate))
            assert isinstance(unknown, UnknownCommit) and unknown.status_code == 412
            assert unknown.fields == {
                "your_commit": candidate,
                "head_commit": head,
                "window": 3,
                "remediation": REMEDIATION_UNKNOWN,
            }

    run_with_gate(config(repo, window=3), scenario, min_forced_refresh_seconds=0)


def test_repeated_stale_checks_run_no_git_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = make_repo(tmp_path / "repo", 6)
    calls, _ = install_shim(tmp_path, monkeypatch)

    async def scenario(gate: VersionGate) -> None:
        calls.write_text("")
        errors = await asyncio.gather(*(raises(gate.check(commits[0])) for _ in range(20)))
        assert all(isinstance(e, StaleCommit) and e.fields["behind_by"] == 5 for e in errors)
        assert git_calls(calls, "merge-base") == 1 and git_calls(calls, "rev-list") == 1
        calls.write_text("")
        for _ in range(20):
            assert isinstance(await raises(gate.check(commits[0])), StaleCommit)
        assert calls.read_text() == ""

    run_with_gate(config(tmp_path / "repo", window=3), scenario, min_forced_refresh_seconds=0)


def test_failing_git_keeps_window_counts_and_logs_once_per_streak(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    commits = make_repo(repo, 3)
    caplog.set_level(logging.INFO, logger="receiver.gate")

    def warnings() -> int:
        return sum(1 for r in caplog.records if r.levelno == logging.WARNING)

    def recoveries() -> int:
        return sum(1 for r in caplog.records if "recovered" in r.getMessage())

    async def scenario(gate: VersionGate) -> None:
        (repo / ".git").rename(tmp_path / "git-away")
        await wait_until(lambda: failures(gate) >= 3)
        assert warnings() == 1 and recoveries() == 0
        assert gate.state()["head_commit"] == commits[-1]
        assert (await gate.check(commits[-1])).behind_by == 0  # the kept window still answers
        # Not in the window and git cannot classify it: a receiver fault, so 503, not 412.
        assert isinstance(await raises(gate.check(NOT_IN_ANY_REPO)), GateNotReady)
        assert gate.state()["last_error"] is not None

        (tmp_path / "git-away").rename(repo / ".git")
        await wait_until(lambda: gate.state()["last_error"] is None)
        assert recoveries() == 1 and warnings() == 1
        before = failures(gate)

        (repo / ".git").rename(tmp_path / "git-away")
        await wait_until(lambda: failures(gate) >= before + 2)
        assert warnings() == 2  # a new streak, logged once more

    run_with_gate(config(repo, refresh_seconds=0.02), scenario, min_forced_refresh_seconds=0)


def test_a_checkout_of_another_user_is_reported_with_gits_line_in_full_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A path long enough that the old 200-character cut of git's stderr fell inside it.
    repo = tmp_path / ("checkout-of-the-lab-" * 8) / "repo"
    repo.parent.mkdir()
    make_repo(repo, 2)
    give_to_another_user(repo)
    caplog.set_level(logging.WARNING, logger="receiver.gate")
    path = str(repo.resolve())
    line = f"fatal: detected dubious ownership in repository at '{path}'"
    fix = f"run as root: git config --system --add safe.directory {path}"

    async def scenario(gate: VersionGate) -> None:
        assert isinstance(await raises(gate.check(NOT_IN_ANY_REPO)), GateNotReady)
        last_error = str(gate.state()["last_error"])
        assert line in last_error and last_error.endswith(fix)
        assert "--global" not in last_error  # git's own advice does not fit a service user

    run_with_gate(config(repo), scenario, min_forced_refresh_seconds=0)
    logged = [r.getMessage() for r in caplog.records if "refresh failed" in r.getMessage()]
    assert len(logged) == 1
    assert line in logged[0] and logged[0].endswith(fix)


def test_garbage_from_git_log_is_a_failed_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = make_repo(tmp_path / "repo", 2)
    install_shim(tmp_path, monkeypatch)
    (tmp_path / "garbage").touch()

    async def scenario(gate: VersionGate) -> None:
        state = gate.state()
        assert (state["loaded"], state["refresh_failures"]) == (False, 1)
        assert "garbage" in str(state["last_error"])
        assert isinstance(await raises(gate.check(commits[-1])), GateNotReady)

    run_with_gate(config(tmp_path / "repo"), scenario)


def test_hung_git_is_killed_after_the_timeout_and_the_window_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = make_repo(tmp_path / "repo", 3)
    _, hang = install_shim(tmp_path, monkeypatch)

    async def scenario(gate: VersionGate) -> None:
        hang.touch()
        started = time.monotonic()
        error = await raises(gate.check(NOT_IN_ANY_REPO))  # forced refresh, then classify: hang
        assert isinstance(error, GateNotReady)
        assert time.monotonic() - started < 2.0
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert len(pids) == 4  # two git runs, each a shell and its sleep
        assert not any(alive(pid) for pid in pids)
        state = gate.state()
        assert state["refresh_failures"] == 1
        assert "did not finish within 0.3 s" in str(state["last_error"])
        assert (await gate.check(commits[-1])).behind_by == 0

    run_with_gate(config(tmp_path / "repo", git_timeout_seconds=0.3), scenario)


def test_close_kills_a_running_git_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_repo(tmp_path / "repo", 2)
    _, hang = install_shim(tmp_path, monkeypatch)

    async def main() -> None:
        gate = VersionGate(config(tmp_path / "repo", git_timeout_seconds=30.0))
        await gate.start()
        hang.touch()
        pending = asyncio.create_task(gate.check(NOT_IN_ANY_REPO))
        await wait_until(lambda: (tmp_path / "pids").exists())
        started = time.monotonic()
        await gate.close()
        assert time.monotonic() - started < 2.0
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert pids and not any(alive(pid) for pid in pids)
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(main())


def test_warning_starts_exactly_at_the_oldest_fifth(tmp_path: Path) -> None:
    commits = make_repo(tmp_path / "repo", 6)
    assert [warning_threshold(w) for w in (1, 5, 6, 10, 100, 101)] == [0, 4, 4, 8, 80, 80]

    async def scenario(gate: VersionGate) -> None:
        newest_first = list(reversed(commits))
        for behind_by in (0, 3):
            assert (await gate.check(newest_first[behind_by])).warning is None
        warned = await gate.check(newest_first[4])
        assert warned.behind_by == 4 and warned.warning is not None
        assert "4 commits behind" in warned.warning

    run_with_gate(config(tmp_path / "repo", window=5), scenario)


def test_state_reports_what_healthz_needs(tmp_path: Path) -> None:
    commits = make_repo(tmp_path / "repo", 3)

    async def scenario(gate: VersionGate) -> None:
        state = gate.state()
        age = state.pop("last_refresh_age_seconds")
        assert isinstance(age, float) and 0 <= age < 5
        assert state == {
            "enabled": True,
            "loaded": True,
            "ref": "HEAD",
            "window": 5,
            "head_commit": commits[-1],
            "window_size": 3,
            "last_error": None,
            "refresh_failures": 0,
            "refreshes": 1,
        }

    run_with_gate(config(tmp_path / "repo"), scenario)
    off = VersionGate(config(None, enabled=False)).state()
    assert off["enabled"] is False and off["loaded"] is False
    assert off["last_refresh_age_seconds"] is None
