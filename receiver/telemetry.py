"""Request counters, recent rejections and stale-host marks, and /metrics in Prometheus text.

One Telemetry per worker process: the request counters describe the requests *this* worker
answered (prometheus multiprocess mode is deliberately not used). Rejections and stale marks
go to a Marks keeper: the catalogue in a receiver (shared by every worker, kept across
restarts), written from one background thread so the event loop never waits on it.
Memory is bounded whatever clients send: label values and remembered hosts are capped.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from episode_common.wire import ID_PATTERN
from receiver.events import UNAUTHENTICATED_HOST, RequestEvent
from receiver.storage.marks import MemoryMarks, Rejection, StaleMark, StaleRefusal

log = logging.getLogger(__name__)

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


class Marks(Protocol):
    """Where rejections and stale marks are kept (the Catalogue has these methods)."""

    def record_rejection(self, rejection: Rejection) -> None: ...

    def recent_rejections(self, since: float) -> list[Rejection]: ...

    def record_stale(self, refusal: StaleRefusal) -> None: ...

    def record_accepted(self, host_id: str, at: float) -> None: ...

    def stale_marks(self, since: float) -> dict[str, StaleMark]: ...


# Writes waiting for the background thread; under a flood the oldest are dropped (the keeper
# keeps only the newest 1,000 rejections anyway), so memory stays flat.
MAX_PENDING_WRITES = 1000


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
        marks: Marks | None = None,
    ) -> None:
        # Long only because each Prometheus metric is declared here, one block each, with
        # its help text: splitting them up would scatter what /metrics shows.
        """marks: a shared keeper, written in the background; None: this process's memory."""
        if recent_rejections < 1 or stale_mark_seconds <= 0:
            raise ValueError("recent_rejections must be >= 1 and stale_mark_seconds > 0")
        self.pid = os.getpid()
        self.started_at = time.time()
        self._stale_mark_seconds = stale_mark_seconds
        self._max_host_labels = max_host_labels
        self._recent = recent_rejections
        self._lock = threading.Lock()
        # `is None`, not `or`: a catalogue with no rows is falsy (it has __len__).
        self._marks: Marks = (
            MemoryMarks(max_rejections=recent_rejections, max_stale_hosts=max_stale_hosts)
            if marks is None
            else marks
        )
        self._background = marks is not None
        self._pending: deque[tuple[Callable[[Any], None], object]] = deque()
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._closing = False
        self.dropped_marks = 0
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
        if is_rejection(event):
            rejection = Rejection(
                time=event.finished_at,
                method=event.method,
                host=event.host_id[:_KEEP_CHARS],
                episode=event.episode_id[:_KEEP_CHARS],
                outcome=outcome,
                status=event.status,
                commit=event.commit,
                behind_by=event.behind_by,
            )
            self._keep(self._marks.record_rejection, rejection)
        if not _VALID_ID.fullmatch(event.host_id):
            return
        if outcome in STALE_OUTCOMES:
            refusal = StaleRefusal(
                host=event.host_id,
                at=event.finished_at,
                commit=event.commit,
                reason=outcome,
                behind_by=event.behind_by,
                episode=event.episode_id[:_KEEP_CHARS],
            )
            self._keep(self._marks.record_stale, refusal)
        elif outcome == "stored":
            self._keep(
                lambda host: self._marks.record_accepted(host, event.finished_at), event.host_id
            )

    def _keep(self, write: Callable[[Any], None], item: object) -> None:
        """Write to the marks keeper: at once in memory, else on the background thread."""
        if not self._background:
            write(item)
            return
        with self._lock:
            if len(self._pending) >= MAX_PENDING_WRITES:
                self._pending.popleft()
                self.dropped_marks += 1
            self._pending.append((write, item))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_all, name="marks", daemon=True)
                self._writer.start()
            self._wake.notify()

    def _write_all(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                write, item = self._pending.popleft()
            try:
                write(item)
            except Exception as error:  # a full disk must not stop the counting
                log.warning("could not keep a rejection or stale mark: %s", error)

    def close(self) -> None:
        """Let queued marks reach the keeper (at shutdown, before the catalogue closes)."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=10)

    def _bounded_host_label(self, host_id: str) -> str:
        label = host_label(host_id)
        if label == "invalid" or label in self._host_labels:
            return label
        if len(self._host_labels) >= self._max_host_labels:
            return "other"  # with auth off, anyone can invent valid ids; series stay bounded
        self._host_labels.add(label)
        return label

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

    def recent_rejections(self, now: float | None = None) -> list[dict[str, object]]:
        """Newest first, at most recent_rejections of the last stale_mark_seconds.
        Blocking (the keeper may be on disk): callers on the event loop use a thread."""
        cutoff = (time.time() if now is None else now) - self._stale_mark_seconds
        items = self._marks.recent_rejections(cutoff)[: self._recent]
        return [asdict(item) for item in items]

    def stale_hosts(self, now: float | None = None) -> dict[str, dict[str, object]]:
        """Hosts refused as stale/unknown within stale_mark_seconds: at, commit, reason,
        behind_by, episode, refusals, accepted_since (time of a later stored upload or None).
        Blocking, like recent_rejections."""
        cutoff = (time.time() if now is None else now) - self._stale_mark_seconds
        return {host: asdict(mark) for host, mark in self._marks.stale_marks(cutoff).items()}


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
