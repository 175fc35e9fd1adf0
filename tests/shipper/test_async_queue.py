"""The queue off the event loop: the loop keeps running while a commit waits for the disk.

A slow fsync is simulated: SlowDisk sleeps before each write statement (where SQLite,
synchronous=FULL, would fsync), on whichever thread runs it. Everything else is real.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from shipper.async_queue import AsyncQueue
from shipper.daemon import Daemon
from shipper.queue import Queue
from shipper.spool import Kind
from shipper.states import State
from shipper.upload import ReceiverClient
from tests.shipper.conftest import FakeReceiver, make_config, write_episode

DELAY = 0.3  # the simulated fsync of one commit
WRITES = ("INSERT", "UPDATE", "DELETE", "COMMIT")


class SlowDisk:
    """A connection whose writes take DELAY longer, as on a slow disk; records threads."""

    def __init__(self, conn: sqlite3.Connection, delay: float = DELAY) -> None:
        self.conn, self.delay = conn, delay
        self.threads: set[int] = set()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.threads.add(threading.get_ident())
        if sql.lstrip().upper().startswith(WRITES):
            time.sleep(self.delay)
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        self.threads.add(threading.get_ident())
        return getattr(self.conn, name)


def slow_queue(state_dir: Path, delay: float = DELAY) -> tuple[Queue, SlowDisk]:
    queue = Queue.open(state_dir)
    disk = SlowDisk(queue.conn, delay)
    queue.conn = disk  # type: ignore[assignment]
    return queue, disk


async def ticks_during(work: Any) -> int:
    """How often a 10 ms ticker ran while `work` (a coroutine) was awaited."""
    count = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal count
        while True:
            await asyncio.sleep(0.01)
            if done.is_set():
                return
            count += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker start
    count = 0
    try:
        await work
    finally:
        done.set()
        await task
    return count


def test_the_event_loop_keeps_running_while_a_queue_write_is_in_progress(
    tmp_path: Path,
) -> None:
    queue, _disk = slow_queue(tmp_path)

    async def go() -> tuple[int, int]:
        async_queue = AsyncQueue(queue)

        async def blocking() -> None:  # what the daemon did before: the call on the loop
            queue.add("ep-1", tmp_path / "ep-1", Kind.DIRECTORY)

        blocked = await ticks_during(blocking())
        free = await ticks_during(async_queue.add("ep-2", tmp_path / "ep-2", Kind.DIRECTORY, None))
        await async_queue.aclose()
        return blocked, free

    try:
        blocked, free = asyncio.run(go())
        assert blocked == 0, "the measurement sees a blocked loop"
        # ~30 ticks in 0.3 s; a shared, busy machine still gives far more than 5.
        assert free >= 5, f"the loop ran only {free} times during a {DELAY} s write"
        assert {e.episode_id for e in queue.unshipped()} == {"ep-1", "ep-2"}
    finally:
        queue.close()


def test_a_write_asked_for_is_carried_out_even_when_its_caller_is_cancelled(
    tmp_path: Path,
) -> None:
    queue, _disk = slow_queue(tmp_path)

    async def go() -> None:
        async_queue = AsyncQueue(queue)
        await async_queue.add("ep-1", tmp_path / "ep-1", Kind.DIRECTORY, None)
        writing = asyncio.create_task(async_queue.fatal("ep-1", "parked"))
        await asyncio.sleep(0.05)  # the write is under way on the queue's thread
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        # The one thread runs calls in order: this read comes after the write.
        episode = await async_queue.get("ep-1")
        assert episode is not None and episode.state is State.FATAL
        await async_queue.aclose()

    try:
        asyncio.run(go())
    finally:
        queue.close()


def test_the_daemon_makes_no_queue_call_on_the_event_loop_thread(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = make_config(tmp_path)
    for episode_id in ("ep-1", "ep-2", "ep-3"):
        write_episode(config.spool_dir, episode_id)
    # Slightly slow writes let tasks end while the loop awaits the queue: `once` used to
    # stop with a packed episode left behind when one ended during a dispatch.
    queue, disk = slow_queue(config.state_dir, delay=0.005)

    async def go() -> None:
        client = ReceiverClient(
            config.receiver_url,
            config.host_id,
            commit_header=config.commit_header,
            token=None,
            timeout_seconds=5.0,
            transport=receiver.transport(),
        )
        try:
            await Daemon(config, queue, client, once=True).run(asyncio.Event())
        finally:
            await client.aclose()

    try:
        asyncio.run(go())  # on this thread
        assert disk.threads and threading.get_ident() not in disk.threads
        assert queue.counts()[State.SHIPPED] == 3, [
            (e.state, e.last_error) for e in queue.unshipped()
        ]
    finally:
        queue.close()
