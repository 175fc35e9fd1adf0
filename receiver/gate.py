"""The version gate: accept a commit only if it is among the last `window` commits of `ref`.

git runs as an asyncio child (never blocking the loop), bounded by git_timeout_seconds, killed
and reaped on timeout or close. One refresh runs at a time; a failed one keeps the previous
window. A gate that never loaded answers 503, never 412.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from receiver.config import GateConfig
from receiver.errors import GateNotReady, MalformedCommit, MissingCommit, StaleCommit, UnknownCommit
from receiver.git_errors import describe
from receiver.ids import normalise_commit

logger = logging.getLogger(__name__)

CLASSIFICATION_CACHE_SIZE = 4096


def warning_threshold(window: int) -> int:
    """The smallest behind_by that gets a warning: the oldest fifth of the window."""
    return window - math.ceil(window / 5)


@dataclass(frozen=True)
class GateVerdict:
    commit: str | None
    behind_by: int | None
    window: int
    head_commit: str | None
    warning: str | None


@dataclass(frozen=True)
class _Window:
    commits: tuple[str, ...]
    positions: dict[str, int]


class GitError(Exception):
    """git failed, timed out, or printed something else than we asked for."""


class VersionGate:
    """Answers whether a commit is recent enough; refreshes its window in the background.

    Counters: `refreshes` counts every `git log` attempt, `refresh_failures` the failed ones.
    """

    def __init__(self, config: GateConfig, *, min_forced_refresh_seconds: float = 1.0) -> None:
        if min_forced_refresh_seconds < 0:
            raise ValueError("min_forced_refresh_seconds must be >= 0")
        self._config = config
        self._min_forced = min_forced_refresh_seconds
        self._window: _Window | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._last_forced = -math.inf
        self._last_success: float | None = None
        self._last_error: str | None = None
        self._failure_streak = 0
        self._refreshes = 0
        self._refresh_failures = 0
        # (commit, head) -> behind_by for stale, None for unknown.
        self._classified: OrderedDict[tuple[str, str], int | None] = OrderedDict()
        self._classifying: dict[tuple[str, str], asyncio.Task[int | None]] = {}
        self._children: set[asyncio.subprocess.Process] = set()

    @property
    def header_name(self) -> str:
        return self._config.header

    async def start(self) -> None:
        if not self._config.enabled:
            return
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="gate-refresher")

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._classifying.values()]
        tasks += [t for t in (self._refresher, self._refresh_task) if t is not None]
        for task in tasks:
            task.cancel()
        # Cancelled git runs kill and reap their own child; this catches any left behind.
        for proc in list(self._children):
            _kill(proc)
        await asyncio.gather(*tasks, return_exceptions=True)

    def parse_header(self, value: str | None) -> str | None:
        commit = normalise_commit(value) if value is not None else None
        if not self._config.enabled:
            return commit
        fields = {"remediation": self._config.remediation}
        if value is None or not value.strip():
            raise MissingCommit(f"header {self._config.header} is required", fields=fields)
        if commit is None:
            raise MalformedCommit(
                f"header {self._config.header} must be a full commit id: 40 or 64 hex digits",
                fields=fields,
            )
        return commit

    async def check(self, commit: str | None) -> GateVerdict:
        commit = self.parse_header(commit)
        if not self._config.enabled or commit is None:  # None only when the gate is off
            head = self._window.commits[0] if self._window else None
            return GateVerdict(commit, None, self._config.window, head, None)
        if self._window is None:
            raise self._not_ready("the version gate has not loaded its commit window yet")
        verdict = self._lookup(commit)
        if verdict is not None:
            return verdict
        head = self._window.commits[0]
        # A stale commit stays stale while ref only moves forward, so skip the refresh.
        # An unknown one may have been pushed a second ago: always look again.
        cached = self._classified.get((commit, head))
        if cached is not None:
            raise self._refusal(commit, head, cached)
        await self._forced_refresh()
        verdict = self._lookup(commit)
        if verdict is not None:
            return verdict
        head = self._window.commits[0]
        try:
            behind_by = await self._classify(commit, head)
        except GitError as error:
            # Cannot tell stale from unknown: a receiver fault, so 503 rather than a fatal 412.
            raise self._not_ready(
                f"the version gate cannot classify this commit: {error}"
            ) from None
        raise self._refusal(commit, head, behind_by)

    def state(self) -> dict[str, object]:
        window = self._window
        age = None if self._last_success is None else time.monotonic() - self._last_success
        return {
            "enabled": self._config.enabled,
            "loaded": window is not None,
            "ref": self._config.ref,
            "window": self._config.window,
            "head_commit": window.commits[0] if window else None,
            "window_size": len(window.commits) if window else 0,
            "last_refresh_age_seconds": age,
            "last_error": self._last_error,
            "refresh_failures": self._refresh_failures,
            "refreshes": self._refreshes,
        }

    def position(self, commit: str) -> int | None:
        """behind_by of a commit in the current window, or None (outside it, or not loaded)."""
        if self._window is None:
            return None
        return self._window.positions.get(commit.lower())

    def _lookup(self, commit: str) -> GateVerdict | None:
        assert self._window is not None
        behind_by = self._window.positions.get(commit)
        if behind_by is None:
            return None
        window, head = self._config.window, self._window.commits[0]
        warning = None
        if behind_by >= warning_threshold(window):
            warning = (
                f"commit {commit} is {behind_by} commits behind {self._config.ref}; commits "
                f"{window} or more behind are refused, update this host's code soon"
            )
        return GateVerdict(commit, behind_by, window, head, warning)

    def _refusal(
        self, commit: str, head: str, behind_by: int | None
    ) -> StaleCommit | UnknownCommit:
        ref, window = self._config.ref, self._config.window
        fields: dict[str, object] = {"your_commit": commit, "head_commit": head, "window": window}
        if behind_by is None:
            fields["remediation"] = self._config.remediation_unknown
            detail = f"commit is not reachable from {ref} (unpushed, another branch, rewritten)"
            return UnknownCommit(detail, fields=fields)
        fields |= {"behind_by": behind_by, "remediation": self._config.remediation}
        detail = f"commit is {behind_by} commits behind {ref}; only the last {window} are accepted"
        return StaleCommit(detail, fields=fields)

    def _not_ready(self, detail: str) -> GateNotReady:
        retry_after = max(1, math.ceil(self._config.refresh_seconds))
        return GateNotReady(detail, headers={"Retry-After": str(retry_after)})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.refresh_seconds)
            try:
                await self._refresh()
            except Exception:
                # A bug here must not end refreshing for the life of the daemon.
                logger.exception("version gate refresher: unexpected error")

    async def _refresh(self) -> None:
        """Run a refresh, or join the one already running; never raises."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._load_window(), name="gate-refresh")
        # Shielded: a caller that goes away must not cancel the refresh others wait for.
        await asyncio.shield(self._refresh_task)

    async def _forced_refresh(self) -> None:
        """Join a running refresh, or start one no sooner than min_forced_refresh_seconds after
        the previous forced one. Callers inside that pause wait for the next one instead of
        being refused, so a commit pushed just before the request is always seen."""
        arrived = time.monotonic()
        while True:
            if self._refresh_task is not None and not self._refresh_task.done():
                await asyncio.shield(self._refresh_task)
                return
            if self._last_forced >= arrived:
                return  # a refresh started after we arrived has finished
            pause = self._last_forced + self._min_forced - time.monotonic()
            if pause <= 0:
                self._last_forced = time.monotonic()
                await self._refresh()
                return
            await asyncio.sleep(pause)

    async def _load_window(self) -> None:
        config = self._config
        self._refreshes += 1
        try:
            if config.remote is not None:
                await self._fetch(config.remote)
            out = await self._git(
                "log", "--no-show-signature", "--format=%H", "-n", str(config.window),
                "--end-of-options", config.ref, "--",
            )  # fmt: skip
            commits = tuple(out.split())
            if not commits or any(normalise_commit(c) != c for c in commits):
                raise GitError(f"git log printed no commit ids or garbage: {out[:80]!r}")
        except GitError as error:
            self._refresh_failures += 1
            self._failure_streak += 1
            self._last_error = str(error)
            if self._failure_streak == 1:
                logger.warning(
                    "version gate refresh failed, keeping the window (head=%s), "
                    "further failures are counted until it recovers: %s",
                    self._window.commits[0] if self._window else None, error,
                )  # fmt: skip
            return
        first = self._window is None
        self._window = _Window(commits, {c: i for i, c in enumerate(commits)})
        self._last_success = time.monotonic()
        self._last_error = None
        if self._failure_streak:
            logger.info(
                "version gate refresh recovered after %d failures: head=%s window_size=%d",
                self._failure_streak, commits[0], len(commits),
            )  # fmt: skip
            self._failure_streak = 0
        elif first:
            logger.info("version gate loaded: head=%s window_size=%d", commits[0], len(commits))

    async def _classify(self, commit: str, head: str) -> int | None:
        """behind_by when commit is an ancestor of head, None when unknown; one git run per key."""
        key = (commit, head)
        if key in self._classified:
            self._classified.move_to_end(key)
            return self._classified[key]
        task = self._classifying.get(key)
        if task is None:
            task = asyncio.create_task(self._classify_uncached(key))
            self._classifying[key] = task
        return await asyncio.shield(task)

    async def _classify_uncached(self, key: tuple[str, str]) -> int | None:
        commit, head = key
        try:
            behind_by: int | None = None
            code, _, err = await self._run_git(("merge-base", "--is-ancestor", commit, head))
            if code == 0:
                behind_by = int(await self._git("rev-list", "--count", f"{commit}..{head}", "--"))
            elif code != 1:
                # merge-base exits 128 both for "no such commit here" and for a broken
                # repository; rev-parse --quiet tells them apart (1 = no such commit).
                found, _, _ = await self._run_git(
                    ("rev-parse", "-q", "--verify", f"{commit}^{{commit}}")
                )
                if found != 1:
                    raise GitError(f"git merge-base exited {code} for {commit}: {describe(err)}")
            self._classified[key] = behind_by
            while len(self._classified) > CLASSIFICATION_CACHE_SIZE:
                self._classified.popitem(last=False)
            return behind_by
        except ValueError:
            raise GitError("git rev-list --count printed no number") from None
        finally:
            del self._classifying[key]

    async def _fetch(self, remote: str) -> None:
        """Bring the remote-tracking branches up to date; its own, longer, timeout."""
        args = ("fetch", "--quiet", "--no-tags", "--prune", "--end-of-options", remote)
        code, _, err = await self._run_git(args, timeout=self._config.fetch_timeout_seconds)
        if code != 0:
            raise GitError(f"git fetch {remote} exited {code}: {describe(err)}")

    async def _git(self, *args: str) -> str:
        code, out, err = await self._run_git(args)
        if code != 0:
            raise GitError(f"git {args[0]} exited {code}: {describe(err)}")
        return out

    async def _run_git(
        self, args: tuple[str, ...], timeout: float | None = None
    ) -> tuple[int, str, str]:
        if self._config.repo_path is None:
            raise GitError("version_gate.repo_path is not set")
        timeout = timeout or self._config.git_timeout_seconds
        try:
            proc = await asyncio.create_subprocess_exec(
                "git", "-C", str(self._config.repo_path), *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=_git_env(),
                start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            raise GitError(f"cannot run git: {error}") from None
        self._children.add(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            raise GitError(f"git {args[0]} did not finish within {timeout:g} s") from None
        finally:
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
            self._children.discard(proc)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# English messages (their text is matched), and never a credentials prompt: a fetch that
# needs one fails at once instead of hanging until its timeout.
def _git_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: git and anything it started
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
