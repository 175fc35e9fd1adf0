"""One episode's way to the receiver: prepare (commit, pack, hash), then HEAD, PUT, verdict.

Each step records its result in the queue before the next begins, so a crash
repeats at most one step. Uploads start with HEAD: after a crash the receiver
says whether the episode already arrived, and no body is sent for a stale commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path

from episode_common.config_loading import ConfigError
from episode_common.wire import TARBALL_SUFFIX
from shipper import changes
from shipper.async_queue import AsyncQueue
from shipper.backoff import ReceiverHealth, backoff_seconds
from shipper.config import ShipperConfig, read_token
from shipper.inflight import InFlight
from shipper.outcome import (
    Outcome,
    Verdict,
    classify_gate,
    classify_head,
    classify_put,
    classify_refusal,
    transport_failure,
)
from shipper.pack import PackAborted, Packed, PackError, hash_file, pack_directory
from shipper.progress import Progress
from shipper.spool import BadEpisode, Entry, Kind, read_commit
from shipper.states import Episode, ReceiverState, State
from shipper.upload import LocalFileChanged, ReceiverClient, ReceiverUnreachable

log = logging.getLogger(__name__)

MiB = 1 << 20


class Pipeline:
    """The per-episode steps; the daemon decides when each one runs."""

    def __init__(
        self,
        config: ShipperConfig,
        queue: AsyncQueue,
        client: ReceiverClient,
        health: ReceiverHealth,
        *,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.client = client
        self.health = health
        self.packed_dir = config.state_dir / "packed"
        self.stop_packing = threading.Event()
        self.progress = progress
        self.warned_commits: set[str] = set()
        self.held: str | None = None  # the receiver's reason while it refuses our token
        self.inflight = InFlight(
            config.state_dir, config.progress_record_seconds, config.progress_log_seconds
        )

    # --- prepare ----------------------------------------------------------------------

    async def prepare(self, episode: Episode) -> None:
        """Read the commit, then pack (directories) or hash (tarballs) the episode."""
        episode_id = episode.episode_id
        if not await self.queue.start_packing(episode_id):
            return
        try:
            entry = Entry(episode_id, episode.source, episode.kind)
            commit = episode.commit
            if commit is None:
                commit = await asyncio.to_thread(read_commit, entry)
            # First: an episode parked for a refused commit keeps it (status, retry --commit).
            await self.queue.set_commit(episode_id, commit)
            if await self._refused(episode, commit):
                return
            started = time.monotonic()
            packed = await asyncio.to_thread(self._pack, entry)
            manifest = None if packed.manifest is None else changes.encode(packed.manifest)
            await self.queue.finish_packing(
                episode_id, packed.path, packed.sha256, packed.size_bytes, manifest
            )
            elapsed = max(time.monotonic() - started, 1e-6)
            log.info(
                "%s %s: %.1f MiB, sha256 %s, %.2f s (%.0f MiB/s)",
                "packed" if episode.kind is Kind.DIRECTORY else "hashed",
                episode_id,
                packed.size_bytes / MiB,
                packed.sha256,
                elapsed,
                packed.size_bytes / MiB / elapsed,
            )
        except (BadEpisode, PackError) as error:
            await self.queue.fatal(episode_id, str(error))
            log.error("%s: not shipped: %s", episode_id, error)
        except FileNotFoundError as error:
            await self.queue.fatal(episode_id, f"spool entry vanished: {error.filename}")
            log.error("%s: spool entry vanished: %s", episode_id, error.filename)
        except OSError as error:
            delay = self._episode_delay(episode, None)
            await self.queue.retry_later(
                episode_id, f"packing failed: {error}", time.time() + delay
            )
            log.warning("%s: packing failed (%s); retry in %.0f s", episode_id, error, delay)
        except PackAborted:
            await self.queue.abandon(episode_id)
            log.info("%s: packing abandoned for shutdown", episode_id)
        except asyncio.CancelledError:
            await self.queue.abandon(episode_id)
            log.info("%s: packing abandoned for shutdown", episode_id)
            raise
        except Exception as error:  # a bug must not leave the episode "packing" for ever
            delay = self._episode_delay(episode, None)
            await self.queue.retry_later(
                episode_id, f"unexpected error: {error!r}", time.time() + delay
            )
            log.exception("%s: unexpected error while packing", episode_id)

    def _pack(self, entry: Entry) -> Packed:
        if entry.kind is Kind.TARBALL:
            return hash_file(entry.path, self.stop_packing)
        return pack_directory(
            entry.path,
            self.packed_dir,
            entry.episode_id,
            level=self.config.zstd_level,
            threads=self.config.zstd_threads,
            stop=self.stop_packing,
        )

    async def _refused(self, episode: Episode, commit: str) -> bool:
        """Park the episode without any request when its commit was refused before."""
        refusal = await self.queue.refusal(commit)
        if refusal is None:
            return False
        episode_id = episode.episode_id
        await self.queue.fatal(episode_id, refusal.reason, refusal.remediation)
        await self._drop_packed_copy(episode)
        log.error("%s: commit %s was refused earlier; parked without upload", episode_id, commit)
        return True

    # --- upload -----------------------------------------------------------------------

    def packed_copy_ok(self, episode: Episode) -> bool:
        path = episode.packed_path
        try:
            return path is not None and path.stat().st_size == episode.size_bytes
        except OSError:
            return False

    async def upload(self, episode: Episode, token: int) -> None:
        """HEAD, then PUT unless the answer already decided; record the verdict."""
        episode_id = episode.episode_id
        assert episode.commit is not None and episode.sha256 is not None
        if not self.packed_copy_ok(episode):
            log.warning("%s: packed copy missing or changed; preparing it again", episode_id)
            await self.queue.forget_packed(episode_id)
            self.health.abandoned(token)
            return
        if await self._refused(episode, episode.commit) or not await self.queue.start_upload(
            episode_id
        ):
            self.health.abandoned(token)
            return
        if self.held is not None:
            self._reload_token()
        try:
            outcome = await self._exchange(episode)
        except ReceiverUnreachable as error:
            outcome = transport_failure(str(error))
        except LocalFileChanged as error:
            outcome = Outcome(Verdict.DIGEST_MISMATCH, str(error))
        except asyncio.CancelledError:
            await self.queue.abandon(episode_id)
            self.health.abandoned(token)
            log.info("%s: upload abandoned for shutdown", episode_id)
            raise
        except Exception as error:  # a bug must not leave the episode "uploading" for ever
            log.exception("%s: unexpected error while uploading", episode_id)
            outcome = Outcome(Verdict.RETRY_EPISODE, f"unexpected error: {error!r}")
        await self._apply(episode, outcome, token)

    async def _exchange(self, episode: Episode) -> Outcome:
        assert episode.commit is not None and episode.sha256 is not None
        assert episode.packed_path is not None and episode.size_bytes is not None
        head = await self.client.head(episode.episode_id, episode.commit)
        outcome = classify_head(head, episode.sha256)
        if head.status in (400, 412):
            outcome = classify_gate(await self.client.gate(episode.commit), outcome)
        elif outcome.verdict is Verdict.HELD:
            refusal = await self.client.refusal(episode.episode_id, episode.commit)
            outcome = classify_refusal(refusal, outcome)
        if outcome.verdict is not Verdict.PROCEED:
            return outcome
        episode_id, bar = episode.episode_id, self.progress
        if bar is not None:
            bar.upload_started(episode.size_bytes)
        self.inflight.started(episode_id, episode.size_bytes)

        def advance(count: int) -> None:
            self.inflight.advance(episode_id, count)
            if bar is not None:
                bar.advance(count)

        try:
            reply = await self.client.put(
                episode_id,
                episode.commit,
                episode.packed_path,
                episode.size_bytes,
                episode.sha256,
                advance,
            )
        finally:
            self.inflight.ended(episode_id)
            if bar is not None:
                bar.upload_ended()
        return classify_put(reply, episode.sha256)

    def _episode_delay(self, episode: Episode, retry_after: float | None) -> float:
        retry = self.config.retry
        return backoff_seconds(
            episode.attempts + 1,
            base=retry.base_seconds,
            cap=retry.max_seconds,
            jitter=random.random(),
            retry_after=retry_after,
        )

    async def _apply(self, episode: Episode, outcome: Outcome, token: int) -> None:
        episode_id, verdict = episode.episode_id, outcome.verdict
        if verdict is Verdict.RETRY_RECEIVER:
            self.health.failed(token, outcome.reason, outcome.retry_after)
            next_try = max(self.health.next_try, time.time())
            await self.queue.retry_later(episode_id, outcome.reason, next_try)
            await self._save_health()
            log.warning(
                "%s: receiver unavailable: %s; %d consecutive failure(s), retry in %.0f s",
                episode_id,
                outcome.reason,
                self.health.failures,
                next_try - time.time(),
            )
            return
        if verdict is Verdict.HELD:
            await self._hold(episode_id, outcome, token)
            return
        was_unhealthy = not self.health.healthy
        self.health.succeeded(token)
        if was_unhealthy:
            await self._save_health()
            log.info("receiver %s answers again", self.config.receiver_url)
        if self.held is not None:
            self.held = None
            log.info("receiver %s accepts our token again", self.config.receiver_url)
        if verdict is Verdict.SHIPPED:
            await self.queue.shipped(episode_id)
            log.info("%s: shipped (%s, sha256 %s)", episode_id, outcome.reason, episode.sha256)
            await self._drop_packed_copy(episode)
            if outcome.behind_by_warning and episode.commit not in self.warned_commits:
                # Once per commit and process: a hint, not an alarm for every episode.
                self.warned_commits.add(str(episode.commit))
                log.warning("%s: the receiver warns: %s", episode_id, outcome.behind_by_warning)
        elif verdict is Verdict.STALE:
            await self._stale(episode, outcome)
        elif verdict is Verdict.DIGEST_MISMATCH:
            if episode.digest_retries >= self.config.retry.digest_mismatch_attempts:
                await self.queue.fatal(episode_id, f"{outcome.reason} (after re-hashing)")
                await self._drop_packed_copy(episode)
                log.error("%s: fatal: %s, even after re-hashing", episode_id, outcome.reason)
            else:
                await self._drop_packed_copy(episode)
                await self.queue.digest_mismatch(episode_id, outcome.reason)
                log.warning("%s: %s; hashing the local copy again", episode_id, outcome.reason)
        elif verdict is Verdict.FATAL:
            await self.queue.fatal(episode_id, outcome.reason, outcome.remediation)
            await self._drop_packed_copy(episode)
            log.error("%s: fatal: %s", episode_id, outcome.reason)
        else:  # RETRY_EPISODE, or PROCEED where a final answer was due
            delay = self._episode_delay(episode, outcome.retry_after)
            await self.queue.retry_later(episode_id, outcome.reason, time.time() + delay)
            log.warning("%s: %s; retry in %.0f s", episode_id, outcome.reason, delay)

    async def _hold(self, episode_id: str, outcome: Outcome, token: int) -> None:
        """401/403: every upload waits max_seconds; token_file is re-read before the next."""
        cap = self.config.retry.max_seconds
        reason = f"held: {outcome.reason}"
        self.health.failed(token, reason, retry_after=cap)
        next_try = max(self.health.next_try, time.time())
        await self.queue.retry_later(episode_id, reason, next_try)
        await self._save_health()
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

    def _reload_token(self) -> None:
        try:
            self.client.set_token(read_token(self.config))
        except ConfigError as error:
            log.warning("%s; keeping the token read before", error)

    async def _stale(self, episode: Episode, outcome: Outcome) -> None:
        commit = str(episode.commit)
        await self.queue.fatal(episode.episode_id, outcome.reason, outcome.remediation)
        await self._drop_packed_copy(episode)
        new, parked = await self.queue.refuse_commit(commit, outcome.reason, outcome.remediation)
        for other_id in parked:
            if (other := await self.queue.get(other_id)) is not None:
                await self._drop_packed_copy(other)
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

    async def collect_garbage(self) -> int:
        """At start: delete packed copies that a crash left without a waiting episode.

        A kill between "shipped"/"fatal" and the unlink, or between the rename of a
        finished pack and its record, leaves such files; they are only disk space.
        """
        keep: set[Path] = set()
        for episode in await self.queue.packed_copies():
            if episode.state in (State.SHIPPED, State.FATAL):
                await self._drop_packed_copy(episode)
            elif episode.packed_path is not None:
                keep.add(episode.packed_path)
        removed = 0
        for path in self.packed_dir.glob(f"*{TARBALL_SUFFIX}"):
            if path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    async def _drop_packed_copy(self, episode: Episode) -> None:
        """Once shipped or parked, our tarball of a directory is only a second copy on disk."""
        path = episode.packed_path
        if episode.kind is Kind.DIRECTORY and path is not None and path.parent == self.packed_dir:
            path.unlink(missing_ok=True)
            await self.queue.packed_copy_removed(episode.episode_id)

    async def _save_health(self) -> None:
        await self.queue.save_receiver(
            ReceiverState(self.health.failures, self.health.next_try, self.health.last_error)
        )
