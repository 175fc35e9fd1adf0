"""Recent rejections and stale-host marks as the catalogue keeps them, and an in-memory keeper.

Bounded whatever clients send: the newest MAX_REJECTIONS rejections of the last KEEP_SECONDS,
and at most MAX_STALE_HOSTS marks (the least recently marked dropped first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, replace

KEEP_SECONDS = 24 * 3600.0
MAX_REJECTIONS = 1000
MAX_STALE_HOSTS = 10_000


@dataclass(frozen=True)
class Rejection:
    time: float
    method: str
    host: str  # "(unauthenticated)" when the token was refused: the claimed name is not kept
    episode: str
    outcome: str
    status: int
    commit: str | None
    behind_by: int | None


@dataclass(frozen=True)
class StaleRefusal:
    """One upload refused as stale or unknown."""

    host: str
    at: float
    commit: str | None
    reason: str
    behind_by: int | None
    episode: str


@dataclass(frozen=True)
class StaleMark:
    at: float
    commit: str | None
    reason: str
    behind_by: int | None
    episode: str
    refusals: int  # refusals as stale/unknown while the mark was kept
    accepted_since: float | None = None  # a later stored upload of the host


@dataclass(frozen=True)
class CommitSummary:
    episodes: int
    bytes: int


class MemoryMarks:
    """The marks of one process only (the in-memory catalogue, Telemetry without a catalogue)."""

    def __init__(
        self, *, max_rejections: int = MAX_REJECTIONS, max_stale_hosts: int = MAX_STALE_HOSTS
    ) -> None:
        self._lock = threading.Lock()
        self._rejections: deque[Rejection] = deque(maxlen=max_rejections)
        self._stale: OrderedDict[str, StaleMark] = OrderedDict()
        self._max_stale_hosts = max_stale_hosts

    def record_rejection(self, rejection: Rejection) -> None:
        with self._lock:
            self._rejections.append(rejection)

    def recent_rejections(self, since: float) -> list[Rejection]:
        """Newest first."""
        with self._lock:
            return [item for item in reversed(self._rejections) if item.time >= since]

    def record_stale(self, refusal: StaleRefusal) -> None:
        with self._lock:
            previous = self._stale.pop(refusal.host, None)
            self._stale[refusal.host] = StaleMark(
                at=refusal.at,
                commit=refusal.commit,
                reason=refusal.reason,
                behind_by=refusal.behind_by,
                episode=refusal.episode,
                refusals=(previous.refusals if previous else 0) + 1,
            )
            while len(self._stale) > self._max_stale_hosts:
                self._stale.popitem(last=False)

    def record_accepted(self, host_id: str, at: float) -> None:
        with self._lock:
            mark = self._stale.get(host_id)
            if mark is not None:
                # Kept, not cleared: episodes refused earlier are still parked on the host.
                self._stale[host_id] = replace(mark, accepted_since=at)

    def stale_marks(self, since: float) -> dict[str, StaleMark]:
        with self._lock:
            return {host: mark for host, mark in self._stale.items() if mark.at >= since}
