"""Read many stored blobs in parallel with bounded memory.

What counts as a stored blob, and what is only a stray, is the blob store's to say
(BlobStore.scan_blobs); this module only spreads the reading over threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Cancelled(Exception):
    """Raised inside a worker once the run is being stopped (Ctrl-C, a fatal error)."""


def bounded_map(
    work: Callable[[T], R], items: Iterable[T], workers: int, stop: threading.Event
) -> Iterator[tuple[T, R]]:
    """(item, work(item)) in completion order, with at most 2 * workers items in flight.

    If the consumer stops early or raises, stop is set (work should check it and raise
    Cancelled) and queued items are dropped, so the run ends after the files being read.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tools") as pool:
        pending: dict[Future[R], T] = {}
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    yield from _harvest(pending)
                pending[pool.submit(work, item)] = item
            while pending:
                yield from _harvest(pending)
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            raise


def _harvest(pending: dict[Future[R], T]) -> Iterator[tuple[T, R]]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        item = pending.pop(future)
        yield item, future.result()
