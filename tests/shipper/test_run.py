"""`run` mode in-process: file-system events, rescans, settling, retry, shutdown."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from shipper import daemon as daemon_module
from shipper.config import ShipperConfig
from shipper.daemon import Daemon
from shipper.queue import Queue
from shipper.states import State
from shipper.upload import ReceiverClient
from tests.shipper.conftest import OLD, FakeReceiver, make_config, write_episode

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]


async def run_until(
    config: ShipperConfig,
    receiver: FakeReceiver,
    action: Callable[[Queue], object],
    done: Callable[[Queue], bool],
    timeout: float = 10.0,
) -> Queue:
    """Run the daemon, call action (in a thread) once it started, stop when done or at timeout."""
    queue = Queue.open(config.state_dir)
    client = ReceiverClient(
        config.receiver_url,
        config.host_id,
        commit_header=config.commit_header,
        token=None,
        timeout_seconds=5.0,
        transport=receiver.transport(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(Daemon(config, queue, client).run(stop))
    await asyncio.sleep(0.3)

    def act() -> None:
        # SQLite connections belong to their thread: the action gets its own.
        own = Queue.open(config.state_dir)
        try:
            action(own)
        finally:
            own.close()

    await asyncio.to_thread(act)
    deadline = time.monotonic() + timeout

    def finished() -> bool:
        with queue.lock:  # the daemon's queue thread shares this connection
            return done(queue)

    while not finished() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10.0)
    await client.aclose()
    return queue


def shipped(*ids: str) -> Callable[[Queue], bool]:
    def check(queue: Queue) -> bool:
        return all(getattr(queue.get(i), "state", None) is State.SHIPPED for i in ids)

    return check


def test_a_new_episode_is_found_through_file_system_events(tmp_path: Path) -> None:
    config = make_config(tmp_path, settle_seconds=0.3, rescan_seconds=3600)
    receiver = FakeReceiver()
    started = time.monotonic()
    queue = asyncio.run(
        run_until(
            config,
            receiver,
            lambda q: write_episode(config.spool_dir, "ep-1", age=0),
            shipped("ep-1"),
        )
    )
    assert shipped("ep-1")(queue), "found without any rescan (rescan_seconds = 3600)"
    assert time.monotonic() - started < 8


def test_the_periodic_rescan_finds_what_events_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def deaf(spool_dir: Path, stop: asyncio.Event) -> AsyncIterator[set[str]]:
        await stop.wait()
        return
        yield set()

    monkeypatch.setattr(daemon_module, "watch_names", deaf)
    config = make_config(tmp_path, settle_seconds=0.1, rescan_seconds=0.3)
    queue = asyncio.run(
        run_until(
            config,
            FakeReceiver(),
            lambda q: write_episode(config.spool_dir, "ep-1", age=0),
            shipped("ep-1"),
        )
    )
    assert shipped("ep-1")(queue)


def test_an_episode_still_being_written_is_packed_only_after_it_settles(tmp_path: Path) -> None:
    config = make_config(tmp_path, settle_seconds=0.6, rescan_seconds=0.2)
    receiver = FakeReceiver()

    def keep_writing(queue: Queue) -> None:
        directory = write_episode(config.spool_dir, "ep-1", age=0)
        for n in range(12):
            (directory / "data" / "frames.bin").write_bytes(b"frame %d\n" % n * 100)
            time.sleep(0.1)
            assert queue.get("ep-1") is None, "picked up while still changing"

    queue = asyncio.run(run_until(config, receiver, keep_writing, shipped("ep-1")))
    assert shipped("ep-1")(queue)
    body = zstd.decompress(receiver.stored["lab-01/ep-1"])
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = tar.extractfile("data/frames.bin")
        assert member is not None and member.read() == b"frame 11\n" * 100


def test_retry_from_another_process_is_picked_up_by_the_running_daemon(tmp_path: Path) -> None:
    config = make_config(tmp_path, rescan_seconds=0.2)
    receiver = FakeReceiver()
    write_episode(config.spool_dir, "old-1", commit=OLD)

    def fix_and_retry(queue: Queue) -> None:
        deadline = time.monotonic() + 5
        while getattr(queue.get("old-1"), "state", None) is not State.FATAL:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        receiver.window.add(OLD)  # the maintainer widened the window
        assert len(queue.retry_fatal()) == 1

    queue = asyncio.run(run_until(config, receiver, fix_and_retry, shipped("old-1")))
    assert shipped("old-1")(queue)


def test_stop_abandons_an_upload_that_does_not_finish_within_the_grace(tmp_path: Path) -> None:
    config = make_config(tmp_path, shutdown_grace_seconds=0.3)
    receiver = FakeReceiver()

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    receiver.script = [httpx.Response(404), hang]
    write_episode(config.spool_dir, "ep-1")

    def uploading(queue: Queue) -> bool:
        return getattr(queue.get("ep-1"), "state", None) is State.UPLOADING

    started = time.monotonic()
    queue = asyncio.run(run_until(config, receiver, lambda q: None, uploading))
    assert time.monotonic() - started < 5
    episode = queue.get("ep-1")
    assert episode is not None
    assert episode.state is State.PENDING and episode.attempts == 0
    assert episode.sha256 is not None, "the packed copy is kept for the next start"
