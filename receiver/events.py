"""What the HTTP layer reports about each finished request (logs, metrics, status page)."""

from __future__ import annotations

from dataclasses import dataclass

# The host of every request that failed authentication: the name it claimed is not
# trusted, so it never becomes a metric label or a status-page entry.
UNAUTHENTICATED_HOST = "(unauthenticated)"


@dataclass(frozen=True)
class RequestEvent:
    method: str  # "PUT", "HEAD" or "GET" (HEAD's answer with its body)
    host_id: str  # as sent (may be an invalid id; never used as a path)
    episode_id: str
    status: int
    outcome: str  # "stored", "already-present", or the error code, e.g. "stale-commit"
    size_bytes: int  # bytes stored (0 unless stored/already-present)
    duration_seconds: float
    commit: str | None  # lower-case commit when known (header or stored row)
    behind_by: int | None
    finished_at: float  # wall clock, time.time()
