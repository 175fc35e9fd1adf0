"""The index view through a real receiver: start to /readyz 200, RSS per worker process, and
the already-stored HEAD p99, each at --view-rows rows beside the same at 1,000 rows.

The big index is written and its view built once per bench run (the build is its own
figure, view-build); the three runs reuse it. Each run starts both receivers afresh with
the view current, so start-up does no work proportional to the rows.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.baselines import p99
from bench.client import HttpError, get
from bench.figures_ops import put_load
from bench.figures_view import HOSTS, write_rows
from bench.receivers import Bench, processes, receiver
from bench.report import Figure, Target, median, spread
from bench.workload import write_episode_tarball
from receiver.storage import DataDirLayout
from receiver.storage.jsonl import JsonlCatalogue

SMALL_ROWS = 1000
HEAD_SAMPLES = 2000
UPLOAD_CLIENTS = 4


def _key(n: int) -> tuple[str, str]:
    return f"lab-{n % HOSTS:04d}", f"ep-{n:09d}"


def _prepare(home: Path, rows: int, samples: int) -> tuple[Path, float, list[tuple[str, str]]]:
    """A data_dir with `rows` index rows, its view current, and a blob for each sampled key
    (HEAD answers 200 only when the blob is there). Returns (data_dir, build s, keys)."""
    layout = DataDirLayout(home / "data")
    layout.index_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(layout.index_path, rows)
    keys = [_key((number * 7919) % rows) for number in range(min(samples, rows))]
    for host, episode in keys:
        blob = layout.episodes_dir / host / f"{episode}.tar.zst"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"x" * 1000)
    catalogue = JsonlCatalogue(layout.index_path)
    began = time.perf_counter()
    catalogue.recover()
    built = time.perf_counter() - began
    catalogue.close()
    return layout.data_dir, built, keys


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise HttpError(f"no VmRSS for pid {pid}")


def _worker_rss(pid: int) -> float:
    """The largest RSS among the worker processes (the main process if it has none)."""
    workers = processes(pid)[1:] or [pid]
    return max(map(_rss_mib, workers))


def _wait_ready(port: int, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            status, _ = get(port, "/readyz")
        except OSError:
            status = 0
        if status == 200:
            return time.monotonic()
        time.sleep(0.005)
    raise HttpError(f"/readyz on port {port} not 200 in time")


def _head_p99(port: int, keys: list[tuple[str, str]]) -> float:
    """HEAD each stored key on one keep-alive connection; p99 of the round trips."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for host, episode in keys:
            request = f"HEAD /episodes/{host}/{episode} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            began = time.perf_counter()
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    raise HttpError("connection closed mid-response")
                head += chunk
            times.append(time.perf_counter() - began)
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise HttpError(f"HEAD {host}/{episode} answered {status}")
    return p99(times)


@contextmanager
def _started(bench: Bench, name: str) -> Iterator[tuple[int, int, float]]:
    """(port, main pid, seconds from process start to /readyz 200) of a fresh receiver."""
    began = time.monotonic()
    with receiver(bench, name, workers=bench.sizes.workers, wait=False) as process:
        ready = _wait_ready(process.port, began + 300)
        assert process.proc is not None
        yield process.port, process.proc.pid, ready - began


def receiver_view_figures(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    rows, uploads, workers = sizes.view_rows, sizes.view_uploads, sizes.workers
    ready = Figure(
        "view-ready",
        f"receiver start to /readyz 200, {rows} rows, view current, workers = {workers}",
        "s",
        f"{rows} rows",
        f"{SMALL_ROWS} rows",
        Target("<= 1.0 s", lambda f: median(f.product) <= 1.0),
    )
    rss = Figure(
        "view-rss",
        f"RSS per worker process after start and {uploads} uploads, {rows} rows",
        "MiB",
        f"{rows} rows",
        f"{SMALL_ROWS} rows",
        Target("<= 80 MiB", lambda f: median(f.product) <= 80),
    )
    head = Figure(
        "view-head",
        f"already-stored HEAD p99 through the receiver, {rows} vs {SMALL_ROWS} rows",
        "s",
        f"{rows} rows",
        f"{SMALL_ROWS} rows",
        Target("ratio <= 1.5", lambda f: median(f.ratios) <= 1.5),
    )
    home = bench.fresh_dir("view-receiver")
    logging.getLogger("receiver.storage.jsonl_sync").setLevel(logging.WARNING)
    began = time.perf_counter()
    _, built, big_keys = _prepare(home / "big", rows, HEAD_SAMPLES)
    _, _, small_keys = _prepare(home / "small", SMALL_ROWS, HEAD_SAMPLES)
    ready.notes.append(
        f"index of {rows} rows written and its view built once ({built:.1f} s of "
        f"{time.perf_counter() - began:.1f} s), reused by the {sizes.runs} runs"
    )
    src = home / "upload.tar.zst"
    write_episode_tarball(bench.pool, src, bench.commit, 64 * 1024)
    body = src.read_bytes()
    after_start: dict[str, list[float]] = {"big": [], "small": []}
    for run in range(sizes.runs):
        measured: dict[str, tuple[float, float, float]] = {}
        for name, keys in (("big", big_keys), ("small", small_keys)):
            with _started(bench, f"view-receiver/{name}") as (port, pid, seconds):
                after_start[name].append(_worker_rss(pid))
                latency = _head_p99(port, keys)
                put_load(port, uploads, UPLOAD_CLIENTS, f"v{run}", body, bench.commit, host="up")
                measured[name] = (seconds, _worker_rss(pid), latency)
        ready.add(measured["big"][0], measured["small"][0])
        rss.add(measured["big"][1], measured["small"][1])
        head.add(measured["big"][2], measured["small"][2])
    rss.notes.append(
        f"after start: {spread(after_start['big'])} MiB at {rows} rows, "
        f"{spread(after_start['small'])} MiB at {SMALL_ROWS} rows (VmRSS, largest worker)"
    )
    rss.notes.append(f"the figure is after {uploads} uploads of 64 KiB, {UPLOAD_CLIENTS} clients")
    head.notes.append(
        f"{min(HEAD_SAMPLES, rows)} HEADs of stored episodes on one keep-alive connection"
    )
    head.notes.append(
        f"p99 {spread([v * 1e3 for v in head.product])} ms vs "
        f"{spread([v * 1e3 for v in head.baseline])} ms"
    )
    return [ready, rss, head]
