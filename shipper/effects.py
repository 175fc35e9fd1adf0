"""Carry out an upload's Action (shipper.actions): queue, receiver health, packed copy, log.

One small method per Action, chosen by a table; each records in the queue before it logs.
The packed copies of directories are ours to delete once an episode is shipped or parked.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from episode_common.wire import TARBALL_SUFFIX
from shipper.actions import Action, action_for, receiver_answered
from shipper.async_queue import AsyncQueue
from shipper.backoff import ReceiverHealth, backoff_seconds
from shipper.config import ShipperConfig
from shipper.outcome import Outcome
from shipper.spool import Kind
from shipper.states import Episode, ReceiverState, State

log = logging.getLogger("shipper.pipeline")  # the name operators' log searches know

Handler = Callable[[Episode, Outcome, int], Awaitable[None]]


def episode_delay(config: ShipperConfig, episode: Episode, retry_after: float | None) -> float:
    """How long this episode waits before its next attempt (jittered backoff)."""
    retry = config.retry
    return backoff_seconds(
        episode.attempts + 1,
        base=retry.base_seconds,
        cap=retry.max_seconds,
        jitter=random.random(),
        retry_after=retry_after,
    )


class Effects:
    """What verdicts do; also remembers, per process, what was already said once."""

    def __init__(self, config: ShipperConfig, queue: AsyncQueue, health: ReceiverHealth) -> None:
        self.config = config
        self.queue = queue
        self.health = health
        self.warned_commits: set[str] = set()
        self.held: str | None = None  # the receiver's reason while it refuses our token
        self.handlers: dict[Action, Handler] = {
            Action.BACK_OFF_RECEIVER: self._back_off_receiver,
            Action.HOLD: self._hold,
            Action.SHIP: self._ship,
            Action.PARK_COMMIT: self._park_commit,
            Action.REHASH: self._rehash,
            Action.FATAL_AFTER_REHASH: self._fatal_after_rehash,
            Action.FATAL: self._fatal,
            Action.RETRY_EPISODE: self._retry_episode,
        }

    @property
    def token_refused(self) -> bool:
        return self.held is not None

    async def apply(self, episode: Episode, outcome: Outcome, token: int) -> None:
        """Record the verdict of one upload; token is the one ReceiverHealth.start gave it."""
        limit = self.config.retry.digest_mismatch_attempts
        action = action_for(outcome.verdict, episode.digest_retries, limit)
        if receiver_answered(action):
            await self._receiver_answered(token)
        await self.handlers[action](episode, outcome, token)

    async def _receiver_answered(self, token: int) -> None:
        was_unhealthy = not self.health.healthy
        self.health.succeeded(token)
        if was_unhealthy:
            await self.save_health()
            log.info("receiver %s answers again", self.config.receiver_url)
        if self.held is not None:
            self.held = None
            log.info("receiver %s accepts our token again", self.config.receiver_url)

    # --- one handler per Action ----------------------------------------------------------

    async def _back_off_receiver(self, episode: Episode, outcome: Outcome, token: int) -> None:
        self.health.failed(token, outcome.reason, outcome.retry_after)
        next_try = max(self.health.next_try, time.time())
        await self.queue.retry_later(episode.episode_id, outcome.reason, next_try)
        await self.save_health()
        log.warning(
            "%s: receiver unavailable: %s; %d consecutive failure(s), retry in %.0f s",
            episode.episode_id,
            outcome.reason,
            self.health.failures,
            next_try - time.time(),
        )

    async def _hold(self, episode: Episode, outcome: Outcome, token: int) -> None:
        """401/403: every upload waits max_seconds; token_file is re-read before the next."""
        episode_id, cap = episode.episode_id, self.config.retry.max_seconds
        reason = f"held: {outcome.reason}"
        self.health.failed(token, reason, retry_after=cap)
        next_try = max(self.health.next_try, time.time())
        await self.queue.retry_later(episode_id, reason, next_try)
        await self.save_health()
        if self.held == outcome.reason:
            log.info("%s: still held (%s); retry in %.0f s", episode_id, outcome.reason, cap)
            return
        self.held = outcome.reason
        # Once per reason: every episode is held for the same token.
        log.error(
            "receiver %s refuses our token (%s): uploads held, not fatal; install the host's"
            " token in %s, it is re-read before each retry (every %.0f s, no restart needed)",
            self.config.receiver_url,
            outcome.reason,
            self.config.token_file or "token_file (not set in the config)",
            cap,
        )

    async def _ship(self, episode: Episode, outcome: Outcome, token: int) -> None:
        episode_id = episode.episode_id
        await self.queue.shipped(episode_id)
        log.info("%s: shipped (%s, sha256 %s)", episode_id, outcome.reason, episode.sha256)
        await self.drop_packed_copy(episode)
        if outcome.behind_by_warning and episode.commit not in self.warned_commits:
            # Once per commit and process: a hint, not an alarm for every episode.
            self.warned_commits.add(str(episode.commit))
            log.warning("%s: the receiver warns: %s", episode_id, outcome.behind_by_warning)

    async def _park_commit(self, episode: Episode, outcome: Outcome, token: int) -> None:
        commit = str(episode.commit)
        await self.queue.fatal(episode.episode_id, outcome.reason, outcome.remediation)
        await self.drop_packed_copy(episode)
        new, parked = await self.queue.refuse_commit(commit, outcome.reason, outcome.remediation)
        for other_id in parked:
            if (other := await self.queue.get(other_id)) is not None:
                await self.drop_packed_copy(other)
        if not new:
            return
        others = f"; also parked: {', '.join(parked)}" if parked else ""
        remediation = outcome.remediation or "(the receiver sent no remediation)"
        # Logged once per commit, verbatim: operators copy it into the host's shell.
        log.error(
            "commit %s refused by the receiver (%s): %s parked without upload%s. Remediation:\n%s",
            commit,
            outcome.reason,
            episode.episode_id,
            others,
            remediation.rstrip("\n"),
        )

    async def _rehash(self, episode: Episode, outcome: Outcome, token: int) -> None:
        # The copy goes first: digest_mismatch forgets the path it is found by.
        await self.drop_packed_copy(episode)
        await self.queue.digest_mismatch(episode.episode_id, outcome.reason)
        log.warning("%s: %s; hashing the local copy again", episode.episode_id, outcome.reason)

    async def _fatal_after_rehash(self, episode: Episode, outcome: Outcome, token: int) -> None:
        await self.queue.fatal(episode.episode_id, f"{outcome.reason} (after re-hashing)")
        await self.drop_packed_copy(episode)
        log.error("%s: fatal: %s, even after re-hashing", episode.episode_id, outcome.reason)

    async def _fatal(self, episode: Episode, outcome: Outcome, token: int) -> None:
        await self.queue.fatal(episode.episode_id, outcome.reason, outcome.remediation)
        await self.drop_packed_copy(episode)
        log.error("%s: fatal: %s", episode.episode_id, outcome.reason)

    async def _retry_episode(self, episode: Episode, outcome: Outcome, token: int) -> None:
        delay = episode_delay(self.config, episode, outcome.retry_after)
        await self.queue.retry_later(episode.episode_id, outcome.reason, time.time() + delay)
        log.warning("%s: %s; retry in %.0f s", episode.episode_id, outcome.reason, delay)

    # --- shared with the pipeline's steps ------------------------------------------------

    async def refused(self, episode: Episode, commit: str) -> bool:
        """Park the episode without any request when its commit was refused before."""
        refusal = await self.queue.refusal(commit)
        if refusal is None:
            return False
        episode_id = episode.episode_id
        await self.queue.fatal(episode_id, refusal.reason, refusal.remediation)
        await self.drop_packed_copy(episode)
        log.error("%s: commit %s was refused earlier; parked without upload", episode_id, commit)
        return True

    async def drop_packed_copy(self, episode: Episode) -> None:
        """Once shipped or parked, our tarball of a directory is only a second copy on disk."""
        path, packed_dir = episode.packed_path, self.config.packed_dir
        if episode.kind is Kind.DIRECTORY and path is not None and path.parent == packed_dir:
            path.unlink(missing_ok=True)
            await self.queue.packed_copy_removed(episode.episode_id)

    async def collect_garbage(self) -> int:
        """At start: delete packed copies that a crash left without a waiting episode.

        A kill between "shipped"/"fatal" and the unlink, or between the rename of a
        finished pack and its record, leaves such files; they are only disk space.
        """
        keep: set[Path] = set()
        for episode in await self.queue.packed_copies():
            if episode.state in (State.SHIPPED, State.FATAL):
                await self.drop_packed_copy(episode)
            elif episode.packed_path is not None:
                keep.add(episode.packed_path)
        removed = 0
        for path in self.config.packed_dir.glob(f"*{TARBALL_SUFFIX}"):
            if path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    async def save_health(self) -> None:
        await self.queue.save_receiver(
            ReceiverState(self.health.failures, self.health.next_try, self.health.last_error)
        )
