"""One log line and one telemetry event per episode request, with what it said and did."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from receiver.events import UNAUTHENTICATED_HOST, RequestEvent
from receiver.ids import normalise_commit
from receiver.telemetry import Telemetry

log = logging.getLogger(__name__)

_KEEP = 200  # characters of a client-sent value that reach the log


@dataclass
class RequestFacts:
    """What one episode request said and did."""

    method: str
    claimed_host: str
    episode_id: str
    sent_commit: str | None
    started: float = field(default_factory=time.monotonic)
    authenticated: bool = True
    received: int = 0  # body bytes read from the client
    body: Mapping[str, Any] = field(default_factory=dict)  # the answer's body

    @property
    def host_id(self) -> str:
        # A name claimed without a valid token never becomes a label or a page entry.
        return self.claimed_host if self.authenticated else UNAUTHENTICATED_HOST

    async def meter(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            self.received += len(chunk)
            yield chunk

    def finished(self, telemetry: Telemetry, status: int, outcome: str) -> None:
        duration = time.monotonic() - self.started
        log.info(
            "%s host=%s episode=%s status=%d outcome=%s bytes=%d duration=%.3fs commit=%s",
            self.method,
            self.claimed_host[:_KEEP],
            self.episode_id[:_KEEP],
            status,
            outcome,
            self.received,
            duration,
            self.sent_commit[:_KEEP] if self.sent_commit is not None else None,
        )
        telemetry.request_finished(self._event(status, outcome, duration))

    def _event(self, status: int, outcome: str, duration: float) -> RequestEvent:
        body = self.body
        sent = normalise_commit(self.sent_commit) if self.sent_commit is not None else None
        recorded = body.get("commit") or body.get("your_commit") or sent
        behind_by = body.get("behind_by")
        return RequestEvent(
            method=self.method,
            host_id=self.host_id,
            episode_id=self.episode_id if self.authenticated else "",
            status=status,
            outcome=outcome,
            size_bytes=int(body.get("size_bytes") or 0),
            duration_seconds=duration,
            commit=str(recorded) if recorded else None,
            behind_by=behind_by if isinstance(behind_by, int) else None,
            finished_at=time.time(),
        )
