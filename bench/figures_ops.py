"""Small uploads and the gate's cost under them, cold start, the shipper's packer, verify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import msgspec

from bench.baselines import (
    Unavailable,
    need,
    openssl_rate,
    p99,
    read_seconds,
    small_file_loop,
    tar_zstd_rate,
)
from bench.client import KeepAlive, get, wait_healthy
from bench.receivers import (
    Bench,
    cpu_seconds,
    environment_with_shim,
    git_shim,
    in_threads,
    peak_rss_mib,
    processes,
    receiver,
)
from bench.report import Figure, Target, at_least, median, spread
from bench.workload import MiB, write_episode_dir, write_episode_tarball, write_index, write_store
from receiver.storage import DataDirLayout
from shipper.config import ShipperConfig
from shipper.pack import pack_directory
from tests.support import PROJECT_ROOT


def put_load(
    port: int, count: int, clients: int, tag: str, body: bytes, commit: str, host: str = "host"
) -> list[float]:
    """`clients` keep-alive connections (each its own host id), `count` PUTs of fresh ids in
    all, every one checked to answer 201; returns the latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        mine: list[float] = []
        connection = KeepAlive(port)
        try:
            for item in range(number, count, clients):
                started = time.perf_counter()
                target = f"/episodes/{host}-{number:02d}/{tag}-{item:06d}"
                status, answer = connection.put(target, body, {"X-Code-Commit": commit})
                if status != 201:
                    raise RuntimeError(f"PUT {target} answered {status}: {answer[:200]!r}")
                mine.append(time.perf_counter() - started)
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    in_threads(client, clients)
    return latencies


def small_uploads(bench: Bench) -> list[Figure]:
    """`small` (vs a write+fsync+rename loop) and `gate` (git runs during that load)."""
    sizes = bench.sizes
    count, clients, interval = sizes.small_uploads, sizes.small_clients, sizes.gate_refresh_seconds
    small = Figure(
        "small",
        f"{count} uploads of {sizes.small_kib} KiB, {clients} clients, full durability",
        "req/s",
        "receiver PUTs until 201",
        f"{clients}-thread write+fsync+rename",
        at_least(0.6),
    )
    gate = Figure(
        "gate",
        f"git processes during the small-upload load, refresh_seconds = {interval:g}",
        "runs",
        "git processes spawned",
        "refresh intervals elapsed",
        Target(
            "<= 1 per interval (+1 at the edges), none per request",
            lambda f: all(p <= b + 1 for p, b in zip(f.product, f.baseline, strict=True)),
        ),
        ratio_label="git runs / intervals",
    )
    home = bench.fresh_dir("small")
    src = home / "small.tar.zst"
    size = write_episode_tarball(bench.pool, src, bench.commit, sizes.small_kib * 1024)
    body = src.read_bytes()
    log = git_shim(home / "shim")
    product_p99: list[float] = []
    baseline_p99: list[float] = []
    cpu: list[float] = []
    requests = 0
    with receiver(
        bench,
        "small/receiver",
        env=environment_with_shim(home / "shim"),
        version_gate={"refresh_seconds": interval},
    ) as process:
        assert process.proc is not None
        pids = processes(process.proc.pid)
        for run in range(sizes.runs):
            rate, latency = small_file_loop(home / "loop", count, size, clients)
            baseline_p99.append(latency)
            before = len(log.read_text().splitlines())
            cpu_before = cpu_seconds(pids)
            started = time.perf_counter()
            latencies = put_load(process.port, count, clients, f"r{run}", body, bench.commit)
            elapsed = time.perf_counter() - started
            cpu.append((cpu_seconds(pids) - cpu_before) / count * 1e3)
            git_runs = len(log.read_text().splitlines()) - before
            small.add(count / elapsed, rate)
            product_p99.append(p99(latencies))
            gate.add(git_runs, elapsed / interval)
            requests += count
    small.notes.append(f"body {size} bytes; receiver CPU {spread(cpu)} ms per request")
    small.notes.append(f"p99 receiver {spread([v * 1e3 for v in product_p99])} ms")
    small.notes.append(f"p99 baseline {spread([v * 1e3 for v in baseline_p99])} ms")
    gate.notes.append(f"{requests} requests in all; a git per request would be {requests} runs")
    shutil.rmtree(home)
    return [small, gate]


def cold_start(bench: Bench) -> list[Figure]:
    rows = bench.sizes.index_rows
    figure = Figure(
        "cold-start",
        f"cold start with {rows:,} index rows: process start to /healthz 200",
        "s",
        "receiver start to /healthz 200",
        "reading index.jsonl",
        Target("<= 2 s (median)", lambda f: median(f.product) <= 2.0),
        ratio_label="product time / baseline time",
    )
    home = bench.fresh_dir("cold-start")
    index = DataDirLayout(home / "receiver" / "data").index_path
    index_bytes = write_index(index, rows, bench.commit)
    rss: list[float] = []
    for _ in range(bench.sizes.runs):
        baseline = read_seconds(index)
        started = time.monotonic()
        with receiver(bench, "cold-start/receiver", wait=False) as process:
            ready = wait_healthy(process.port, started + 300)
            health = json.loads(get(process.port, "/healthz")[1])
            assert process.proc is not None
            rss.append(max(map(peak_rss_mib, processes(process.proc.pid))))
        if health["index_rows"] != rows:
            raise RuntimeError(f"receiver loaded {health['index_rows']} rows, not {rows}")
        figure.add(ready - started, baseline)
    figure.notes.append(f"index.jsonl {index_bytes / MiB:.0f} MiB, page cache warm")
    figure.notes.append(f"receiver peak RSS with the index loaded {spread(rss)} MiB")
    shutil.rmtree(home)
    return [figure]


def pack(bench: Bench) -> list[Figure]:
    defaults = {f.name: f.default for f in msgspec.structs.fields(ShipperConfig)}
    level, threads = int(defaults["zstd_level"]), int(defaults["zstd_threads"])
    label = f"{bench.sizes.pack_mib} MiB"
    figure = Figure(
        "pack",
        f"shipper packing a {label} episode directory (zstd_level={level}, zstd_threads={threads})",
        "MB/s",
        "shipper.pack.pack_directory",
        "tar -cf - | zstd -3 -T0, fsync",
        at_least(1.0),
    )
    try:
        need("tar")
        need("zstd")
    except Unavailable as error:
        figure.unavailable = str(error)
        return [figure]
    home = bench.fresh_dir("pack")
    src = home / "episode"
    total = write_episode_dir(bench.pool, src, bench.commit, bench.sizes.pack_mib * MiB)
    out = home / "out"
    out.mkdir()
    packed_bytes = 0
    for run in range(bench.sizes.runs):
        baseline = tar_zstd_rate(src, home / "baseline.tar.zst", total)
        started = time.perf_counter()
        packed = pack_directory(src, out, f"run-{run}", level=level, threads=threads)
        figure.add(total / (time.perf_counter() - started) / 1e6, baseline)
        packed_bytes = packed.size_bytes
        packed.path.unlink()
    figure.notes.append(
        f"half random, half low-entropy input; packed to {packed_bytes / total:.0%}"
    )
    shutil.rmtree(home)
    return [figure]


def verify(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    figure = Figure(
        "verify",
        f"episode-verify over {sizes.verify_mib} MiB of tarballs",
        "MB/s",
        "episode-verify (default --jobs)",
        "openssl dgst -sha256, same files",
        at_least(0.9),
    )
    try:
        need("openssl")
    except Unavailable as error:
        figure.unavailable = str(error)
        return [figure]
    home = bench.fresh_dir("verify")
    data_dir = home / "data"
    files = write_store(bench.pool, data_dir, sizes.verify_mib * MiB, sizes.verify_file_mib * MiB)
    total = sum(path.stat().st_size for path in files)
    command = [sys.executable, "-m", "tools.verify", "--data-dir", str(data_dir)]

    def run_verify() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(command, capture_output=True, cwd=PROJECT_ROOT, check=False)

    first = run_verify()  # also warms the page cache for both sides
    if first.returncode != 0:
        lines = (first.stderr or first.stdout).decode(errors="replace").strip().splitlines()
        figure.unavailable = f"episode-verify exited {first.returncode}: " + (
            lines[-1] if lines else "no output"
        )
    else:
        for _ in range(sizes.runs):
            baseline = openssl_rate(files)
            started = time.perf_counter()
            result = run_verify()
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(f"episode-verify exited {result.returncode} on a clean store")
            figure.add(total / elapsed / 1e6, baseline)
        figure.notes.append(f"{len(files)} files, page cache warm, includes interpreter start")
    shutil.rmtree(home)
    return [figure]
