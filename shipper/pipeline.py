"""One episode's way to the receiver: prepare (commit, pack, hash), then HEAD, PUT, verdict.

Each step records its result in the queue before the next begins, so a crash
repeats at most one step. Uploads start with HEAD: after a crash the receiver
says whether the episode already arrived, and no body is sent for a stale commit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from episode_common.config_loading import ConfigError
from shipper import changes
from shipper.async_queue import AsyncQueue
from shipper.backoff import ReceiverHealth
from shipper.config import ShipperConfig, read_token
from shipper.effects import Effects, episode_delay
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
from shipper.pack import (
    PackAborted,
    Packed,
    PackError,
    hash_file,
    pack_directory,
    remove_temporaries,
)
from shipper.progress import Progress
from shipper.spool import BadEpisode, Entry, Kind, read_commit
from shipper.states import Episode
from shipper.upload import LocalFileChanged, ReceiverClient, ReceiverUnreachable

log = logging.getLogger(__name__)

MiB = 1 << 20


class Pipeline:
    """The per-episode steps; the daemon decides when each one runs.

    Its interface to the daemon: start, prepare, upload, stop; the rest is its own.
    """

    def __init__(
        self,
        config: ShipperConfig,
        queue: AsyncQueue,
        client: ReceiverClient,
        health: ReceiverHealth,
        *,
        progress: Progress | None = None,
    ) -> None:
        self._config = config
        self._queue = queue
        self._client = client
        self._health = health
        self._effects = Effects(config, queue, health)
        self._stop_packing = threading.Event()
        self._progress = progress
        self._inflight = InFlight(
            config.state_dir, config.progress_record_seconds, config.progress_log_seconds
        )

    async def start(self) -> int:
        """Before the first step: a clean packed_dir; returns how many orphans were removed."""
        self._config.packed_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(remove_temporaries, self._config.packed_dir)
        return await self._effects.collect_garbage()

    def stop(self) -> None:
        """Abandon packing at once (shutdown); uploads in flight carry on."""
        self._stop_packing.set()

    # --- prepare ----------------------------------------------------------------------

    async def prepare(self, episode: Episode) -> None:
        """Read the commit, then pack (directories) or hash (tarballs) the episode."""
        episode_id = episode.episode_id
        if not await self._queue.start_packing(episode_id):
            return
        try:
            entry = Entry(episode_id, episode.source, episode.kind)
            commit = episode.commit
            if commit is None:
                commit = await asyncio.to_thread(read_commit, entry)
            # First: an episode parked for a refused commit keeps it (status, retry --commit).
            await self._queue.set_commit(episode_id, commit)
            if await self._effects.refused(episode, commit):
                return
            started = time.monotonic()
            packed = await asyncio.to_thread(self._pack, entry)
            manifest = None if packed.manifest is None else changes.encode(packed.manifest)
            await self._queue.finish_packing(
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
            await self._queue.fatal(episode_id, str(error))
            log.error("%s: not shipped: %s", episode_id, error)
        except FileNotFoundError as error:
            await self._queue.fatal(episode_id, f"spool entry vanished: {error.filename}")
            log.error("%s: spool entry vanished: %s", episode_id, error.filename)
        except OSError as error:
            delay = episode_delay(self._config, episode, None)
            await self._queue.retry_later(
                episode_id, f"packing failed: {error}", time.time() + delay
            )
            log.warning("%s: packing failed (%s); retry in %.0f s", episode_id, error, delay)
        except PackAborted:
            await self._queue.abandon(episode_id)
            log.info("%s: packing abandoned for shutdown", episode_id)
        except asyncio.CancelledError:
            await self._queue.abandon(episode_id)
            log.info("%s: packing abandoned for shutdown", episode_id)
            raise
        except Exception as error:  # a bug must not leave the episode "packing" for ever
            delay = episode_delay(self._config, episode, None)
            await self._queue.retry_later(
                episode_id, f"unexpected error: {error!r}", time.time() + delay
            )
            log.exception("%s: unexpected error while packing", episode_id)

    def _pack(self, entry: Entry) -> Packed:
        if entry.kind is Kind.TARBALL:
            return hash_file(entry.path, self._stop_packing)
        return pack_directory(
            entry.path,
            self._config.packed_dir,
            entry.episode_id,
            level=self._config.zstd_level,
            threads=self._config.zstd_threads,
            stop=self._stop_packing,
        )

    # --- upload -----------------------------------------------------------------------

    def _packed_copy_ok(self, episode: Episode) -> bool:
        path = episode.packed_path
        try:
            return path is not None and path.stat().st_size == episode.size_bytes
        except OSError:
            return False

    async def upload(self, episode: Episode, token: int) -> None:
        """HEAD, then PUT unless the answer already decided; record the verdict."""
        episode_id = episode.episode_id
        assert episode.commit is not None and episode.sha256 is not None
        if not self._packed_copy_ok(episode):
            log.warning("%s: packed copy missing or changed; preparing it again", episode_id)
            await self._queue.forget_packed(episode_id)
            self._health.abandoned(token)
            return
        if await self._effects.refused(
            episode, episode.commit
        ) or not await self._queue.start_upload(episode_id):
            self._health.abandoned(token)
            return
        if self._effects.token_refused:
            self._reload_token()
        try:
            outcome = await self._exchange(episode)
        except ReceiverUnreachable as error:
            outcome = transport_failure(str(error))
        except LocalFileChanged as error:
            outcome = Outcome(Verdict.DIGEST_MISMATCH, str(error))
        except asyncio.CancelledError:
            await self._queue.abandon(episode_id)
            self._health.abandoned(token)
            log.info("%s: upload abandoned for shutdown", episode_id)
            raise
        except Exception as error:  # a bug must not leave the episode "uploading" for ever
            log.exception("%s: unexpected error while uploading", episode_id)
            outcome = Outcome(Verdict.RETRY_EPISODE, f"unexpected error: {error!r}")
        await self._effects.apply(episode, outcome, token)

    async def _exchange(self, episode: Episode) -> Outcome:
        assert episode.commit is not None and episode.sha256 is not None
        assert episode.packed_path is not None and episode.size_bytes is not None
        head = await self._client.head(episode.episode_id, episode.commit)
        outcome = classify_head(head, episode.sha256)
        if head.status in (400, 412):
            outcome = classify_gate(await self._client.gate(episode.commit), outcome)
        elif outcome.verdict is Verdict.HELD:
            refusal = await self._client.refusal(episode.episode_id, episode.commit)
            outcome = classify_refusal(refusal, outcome)
        if outcome.verdict is not Verdict.PROCEED:
            return outcome
        episode_id, bar = episode.episode_id, self._progress
        if bar is not None:
            bar.upload_started(episode.size_bytes)
        self._inflight.started(episode_id, episode.size_bytes)

        def advance(count: int) -> None:
            self._inflight.advance(episode_id, count)
            if bar is not None:
                bar.advance(count)

        try:
            reply = await self._client.put(
                episode_id,
                episode.commit,
                episode.packed_path,
                episode.size_bytes,
                episode.sha256,
                advance,
            )
        finally:
            self._inflight.ended(episode_id)
            if bar is not None:
                bar.upload_ended()
        return classify_put(reply, episode.sha256)

    def _reload_token(self) -> None:
        try:
            self._client.set_token(read_token(self._config))
        except ConfigError as error:
            log.warning("%s; keeping the token read before", error)
