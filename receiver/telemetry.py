"""Request counters, recent rejections and stale-host marks, and /metrics in Prometheus text.

One Telemetry per worker process: the request counters, the rejection ring buffer and the
stale marks describe the requests *this* worker answered (uvicorn workers share no memory,
and prometheus multiprocess mode is deliberately not used). Gate and index figures are the
same in every worker: each one runs its own gate and catches up on the shared index.
Memory is bounded whatever clients send: label values and remembered hosts are capped.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from episode_common.wire import ID_PATTERN
from receiver.events import UNAUTHENTICATED_HOST, RequestEvent

# The contract's id rule: only such ids may become label values.
_VALID_ID = ID_PATTERN
# Outcomes are the contract's error codes; anything else (a bug, a future code with odd
# characters) is folded into "other" so a label value can never be attacker-shaped.
_OUTCOME = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
STALE_OUTCOMES = frozenset({"stale-commit", "unknown-commit"})

# From a 1 KiB episode on loopback (milliseconds) to 10 GiB over a slow lab link
# (10 GiB at 100 Mbit/s is ~15 minutes; on a Raspberry Pi's disk it can be longer).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
)  # fmt: skip

# Strings kept from events are cut to this length: ids are at most 128 characters, so
# anything longer is hostile and only needs to be recognisable, not complete.
_KEEP_CHARS = 160


def host_label(host_id: str) -> str:
    """The rejections_total host label: the id itself when valid, else "invalid"."""
    if host_id == UNAUTHENTICATED_HOST:
        return host_id
    return host_id if _VALID_ID.fullmatch(host_id) else "invalid"


def outcome_label(outcome: str) -> str:
    return outcome if _OUTCOME.fullmatch(outcome) else "other"


def is_rejection(event: RequestEvent) -> bool:
    """A refused or failed request. A 404 to HEAD/GET only means "not stored yet"."""
    if event.status < 400:
        return False
    return event.method == "PUT" or event.status != 404


class Telemetry:
    """Counters and marks from finished requests; all methods are thread-safe."""

    def __init__(
        self,
        *,
        recent_rejections: int = 50,
        stale_mark_seconds: float = 24 * 3600,
        max_host_labels: int = 1000,
        max_stale_hosts: int = 10_000,
    ) -> None:
        if recent_rejections < 1 or stale_mark_seconds <= 0:
            raise ValueError("recent_rejections must be >= 1 and stale_mark_seconds > 0")
        self.pid = os.getpid()
        self.started_at = time.time()
        self._stale_mark_seconds = stale_mark_seconds
        self._max_host_labels = max_host_labels
        self._max_stale_hosts = max_stale_hosts
        self._lock = threading.Lock()
        self._rejections: deque[dict[str, object]] = deque(maxlen=recent_rejections)
        # host -> its last refusal as stale/unknown; insertion order = least recently marked first.
        self._stale: OrderedDict[str, _StaleMark] = OrderedDict()
        self._host_labels: set[str] = set()
        self._free_bytes: int | None = None
        self._index_rows: int | None = None

        self.registry = CollectorRegistry()
        self._uploads = Counter(
            "episode_ingest_uploads",
            "PUT requests answered by this worker, by outcome (stored, already-present, "
            "or the error code)",
            ["outcome"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "episode_ingest_upload_bytes",
            "Bytes of episodes newly stored by this worker",
            registry=self.registry,
        )
        self._duration = Histogram(
            "episode_ingest_upload_duration_seconds",
            "Time from request start to response for every PUT answered by this worker",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._rejected = Counter(
            "episode_ingest_rejections",
            'Refused or failed requests, by reason and host ("invalid" for ids that break '
            'the id rule, "(unauthenticated)" for requests without a valid token, "other" '
            "past the host label cap)",
            ["reason", "host"],
            registry=self.registry,
        )
        self._scrape = _ScrapeCollector()
        self.registry.register(self._scrape)

    # -- recording ---------------------------------------------------------------------

    def request_finished(self, event: RequestEvent) -> None:
        outcome = outcome_label(event.outcome)
        with self._lock:
            if event.method == "PUT":
                self._uploads.labels(outcome).inc()
                self._duration.observe(max(0.0, event.duration_seconds))
                if outcome == "stored":
                    self._bytes.inc(max(0, event.size_bytes))
            if is_rejection(event):
                self._rejected.labels(outcome, self._bounded_host_label(event.host_id)).inc()
                self._rejections.append(
                    {
                        "time": event.finished_at,
                        "method": event.method,
                        "host": event.host_id[:_KEEP_CHARS],
                        "episode": event.episode_id[:_KEEP_CHARS],
                        "outcome": outcome,
                        "status": event.status,
                        "commit": event.commit,
                        "behind_by": event.behind_by,
                    }
                )
            if not _VALID_ID.fullmatch(event.host_id):
                return
            if outcome in STALE_OUTCOMES:
                self._mark_stale(event, outcome)
            elif outcome == "stored" and event.host_id in self._stale:
                # Kept, not cleared: episodes refused earlier are still parked on the host.
                self._stale[event.host_id].accepted_since = event.finished_at

    def _bounded_host_label(self, host_id: str) -> str:
        label = host_label(host_id)
        if label == "invalid" or label in self._host_labels:
            return label
        if len(self._host_labels) >= self._max_host_labels:
            return "other"  # with auth off, anyone can invent valid ids; series stay bounded
        self._host_labels.add(label)
        return label

    def _mark_stale(self, event: RequestEvent, outcome: str) -> None:
        previous = self._stale.pop(event.host_id, None)
        self._stale[event.host_id] = _StaleMark(
            at=event.finished_at,
            commit=event.commit,
            reason=outcome,
            behind_by=event.behind_by,
            episode=event.episode_id[:_KEEP_CHARS],
            refusals=(previous.refusals if previous else 0) + 1,
        )
        while len(self._stale) > self._max_stale_hosts:
            self._stale.popitem(last=False)

    def set_gauges(self, *, free_bytes: int | None, index_rows: int) -> None:
        with self._lock:
            self._free_bytes = free_bytes
            self._index_rows = index_rows

    # -- reading -----------------------------------------------------------------------

    def render_metrics(self, gate_state: dict[str, object]) -> tuple[bytes, str]:
        """The Prometheus text exposition (format 0.0.4, which every Prometheus reads)."""
        with self._lock:
            self._scrape.update(gate_state, self._free_bytes, self._index_rows)
            body = generate_latest(self.registry)
        return body, CONTENT_TYPE_PLAIN_0_0_4

    def recent_rejections(self) -> list[dict[str, object]]:
        """Newest first; copies, so callers may keep them."""
        with self._lock:
            return [dict(item) for item in reversed(self._rejections)]

    def stale_hosts(self, now: float | None = None) -> dict[str, dict[str, object]]:
        """Hosts refused as stale/unknown within stale_mark_seconds: at, commit, reason,
        behind_by, episode, refusals, accepted_since (time of a later stored upload or None)."""
        cutoff = (time.time() if now is None else now) - self._stale_mark_seconds
        with self._lock:
            return {host: asdict(mark) for host, mark in self._stale.items() if mark.at >= cutoff}


@dataclass
class _StaleMark:
    at: float
    commit: str | None
    reason: str
    behind_by: int | None
    episode: str
    refusals: int  # refusals as stale/unknown while the mark was kept
    accepted_since: float | None = None


class _ScrapeCollector:
    """Figures owned by others (gate, disk, index), turned into metrics at scrape time."""

    def __init__(self) -> None:
        self._gate: dict[str, object] = {}
        self._free_bytes: int | None = None
        self._index_rows: int | None = None

    def update(self, gate: dict[str, object], free_bytes: int | None, rows: int | None) -> None:
        self._gate, self._free_bytes, self._index_rows = dict(gate), free_bytes, rows

    def collect(self) -> Iterator[Metric]:
        gate = self._gate
        yield _counter("gate_refreshes", "git log runs by the version gate", gate.get("refreshes"))
        yield _counter(
            "gate_refresh_failures",
            "Failed gate refreshes (the previous window was kept)",
            gate.get("refresh_failures"),
        )
        yield _gauge("gate_window_size", "Commits in the gate's window", gate.get("window_size"))
        yield _gauge("gate_loaded", "1 when the gate has a window", bool(gate.get("loaded")))
        yield _gauge("gate_enabled", "0 when every commit is accepted", gate.get("enabled"))
        # Absent until the first successful refresh: alert on gate_loaded == 0 for that case.
        yield _gauge(
            "gate_last_refresh_age_seconds",
            "Seconds since the last successful gate refresh",
            gate.get("last_refresh_age_seconds"),
        )
        yield _gauge("free_disk_bytes", "Free bytes on the data disk", self._free_bytes)
        yield _gauge("index_rows", "Rows in the catalogue index", self._index_rows)


def _number(value: object) -> float | None:
    if isinstance(value, bool | int | float) and not (
        isinstance(value, float) and math.isnan(value)
    ):
        return float(value)
    return None


def _counter(name: str, documentation: str, value: object) -> Metric:
    family = CounterMetricFamily(f"episode_ingest_{name}", documentation)
    number = _number(value)
    if number is not None:
        family.add_metric([], number)
    return family


def _gauge(name: str, documentation: str, value: object) -> Metric:
    family = GaugeMetricFamily(f"episode_ingest_{name}", documentation)
    number = _number(value)
    if number is not None:
        family.add_metric([], number)
    return family
