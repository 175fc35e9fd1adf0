"""The s3 backend against SeaweedFS: one upload and 8 concurrent ones against boto3 straight to
the same server, and the receiver's memory during 8 concurrent 1 GiB uploads.

SeaweedFS runs from tests/seaweed.py (loopback only, telemetry off); with more than 1 GiB a
run each run gets a fresh one (its predecessor's data removed: SeaweedFS frees deleted
objects' space only when it compacts), so the disk never holds more than one run's
objects. Each run starts its own receivers and measures each product right before its
direct baseline on the same server. The direct upload is boto3, the client the backend
uses, in a multipart loop with the receiver's part size and one part in flight.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from bench.client import put_file
from bench.receivers import (
    Bench,
    cpu_seconds,
    in_threads,
    peak_rss_mib,
    processes,
    receiver,
    reset_peak_rss,
    upload,
)
from bench.report import Figure, Target, at_least, spread
from bench.workload import MiB, write_episode_tarball
from tests.seaweed import SeaweedServer

BUCKET = "bench"
DIRECT_PREFIX = "direct/"


def size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def start_seaweed(root: Path, figures: list[Figure]) -> SeaweedServer | None:
    """A started SeaweedFS in root; None (and every figure unavailable) if it cannot run."""
    try:
        return SeaweedServer(root).start()
    except (RuntimeError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:200]
        for figure in figures:
            figure.unavailable = f"SeaweedFS cannot run here ({reason})"
        return None


def storage_section(bench: Bench, server: SeaweedServer, home: Path) -> dict[str, Any]:
    return server.storage_section(
        BUCKET, home / "s3-credentials.toml", part_size_bytes=bench.sizes.s3_part_mib * MiB
    )


def empty_bucket(server: SeaweedServer) -> None:
    """Delete every object (the next phase starts on an empty bucket)."""
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


class Direct:
    """boto3 straight to the server: a single PUT up to one part, else a multipart loop with
    one part in flight, from the file (page cache) through one reused part buffer."""

    def __init__(self, server: SeaweedServer, part_size: int) -> None:
        self.client = server.client()
        self.part_size = part_size

    def put(self, src: Path, key: str) -> None:
        size = src.stat().st_size
        with src.open("rb", buffering=0) as source:
            if size <= self.part_size:
                self.client.put_object(Bucket=BUCKET, Key=key, Body=source.read())
                return
            upload_id = self.client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
            buffer = bytearray(self.part_size)
            parts: list[dict[str, Any]] = []
            while got := source.readinto(buffer):
                body = buffer if got == len(buffer) else bytes(buffer[:got])
                number = len(parts) + 1
                answer = self.client.upload_part(
                    Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self.client.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    def put_threaded(self, src: Path, key: str) -> None:
        """boto3's own upload_fileobj (its default 10 threads), the same part size."""
        config = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size
        )
        with src.open("rb") as source:
            self.client.upload_fileobj(source, BUCKET, key, Config=config)


def rate(total_bytes: int, started: float) -> float:
    return total_bytes / (time.perf_counter() - started) / 1e6


def concurrently(port: int, count: int, episode: str, src: Path, commit: str) -> None:
    """`count` uploads of src at once to the port (a receiver or nginx), hosts host-00.."""

    def one(number: int) -> None:
        target = f"/episodes/host-{number:02d}/{episode}"
        status, body = put_file(port, target, src, {"X-Code-Commit": commit})
        if status != 201:
            raise RuntimeError(f"upload {target} answered {status}: {body[:300]!r}")

    in_threads(one, count)


def s3_figures(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    count, part = sizes.concurrent_uploads, sizes.s3_part_mib
    single = Figure(
        "s3-upload",
        f"one {size_label(sizes.upload_mib)} upload into SeaweedFS (s3 backend, "
        f"{part} MiB parts, validate=tar)",
        "MB/s",
        "receiver PUT until 201",
        "boto3 multipart loop, same server",
        at_least(0.85),
    )
    concurrent = Figure(
        "s3-concurrent",
        f"{count} concurrent {size_label(sizes.s3_concurrent_mib)} uploads into SeaweedFS, "
        f"[server] workers = {sizes.workers}",
        "MB/s",
        "aggregate, all 201",
        f"boto3, {count} threads, same server",
        at_least(0.85),
    )
    limit = 64 + count * 2 * part
    rss = Figure(
        "s3-rss",
        f"receiver peak RSS during {count} concurrent {size_label(sizes.s3_rss_mib)} uploads "
        "into SeaweedFS, one process (workers = 1)",
        "MiB",
        f"VmHWM, {count} uploads at once",
        "VmHWM after start, idle",
        Target(f"<= 64 MiB + {count} x 2 parts = {limit} MiB", lambda f: max(f.product) <= limit),
    )
    figures = [single, concurrent, rss]
    home = bench.fresh_dir("s3")
    src = home / "single.tar.zst"
    write_episode_tarball(bench.pool, src, bench.commit, sizes.upload_mib * MiB)
    each = home / "each.tar.zst"
    write_episode_tarball(bench.pool, each, bench.commit, sizes.s3_concurrent_mib * MiB)
    large = home / "large.tar.zst"
    write_episode_tarball(bench.pool, large, bench.commit, sizes.s3_rss_mib * MiB)
    # SeaweedFS frees deleted objects' space only when it compacts its volumes: above
    # 1 GiB a run, each run gets a fresh server (and the last one's data is removed).
    run_bytes = sum(path.stat().st_size for path in (src, src, each, large)) * count
    notes = _Notes()
    server: SeaweedServer | None = None
    try:
        for run in range(sizes.runs):
            if server is None or run_bytes > 2**30:
                if server is not None:
                    server.stop()
                    shutil.rmtree(server.root, ignore_errors=True)
                server = start_seaweed(home / f"seaweed-{run}", figures)
                if server is None:
                    return figures
                storage = storage_section(bench, server, home)
                Direct(server, part * MiB).put(each, f"{DIRECT_PREFIX}warm-up")
            _run(bench, server, storage, run, (src, each, large), figures, notes)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
    single.notes.append(f"receiver CPU (user+sys) {spread(notes.cpu)} s per GiB")
    single.notes.append(f"SeaweedFS CPU during it {spread(notes.store_cpu)} s per GiB")
    single.notes.append(f"boto3 upload_fileobj (10 threads) {spread(notes.threaded)} MB/s")
    if not notes.resettable:
        rss.notes.append("VmHWM could not be reset: each value is the peak since start")
    return figures


@dataclass
class _Notes:
    threaded: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    store_cpu: list[float] = field(default_factory=list)
    resettable: bool = True


def _run(
    bench: Bench,
    server: SeaweedServer,
    storage: dict[str, Any],
    run: int,
    files: tuple[Path, Path, Path],
    figures: list[Figure],
    notes: _Notes,
) -> None:
    """One run: each product right before its direct baseline on the same server."""
    sizes, (src, each, large), (single, concurrent, rss) = bench.sizes, files, figures
    count = sizes.concurrent_uploads
    assert server.proc is not None
    store_pid = server.proc.pid
    direct = Direct(server, sizes.s3_part_mib * MiB)
    empty_bucket(server)
    size, each_size = src.stat().st_size, each.stat().st_size
    with receiver(bench, f"s3/receiver-{run}", workers=sizes.workers, storage=storage) as p:
        assert p.proc is not None
        pids = processes(p.proc.pid)
        before, store_before = cpu_seconds(pids), cpu_seconds([store_pid])
        started = time.perf_counter()
        upload(p, "bench", f"single-{run}", src, bench.commit)
        product = rate(size, started)
        notes.cpu.append((cpu_seconds(pids) - before) / (size / 2**30))
        notes.store_cpu.append((cpu_seconds([store_pid]) - store_before) / (size / 2**30))
        started = time.perf_counter()
        direct.put(src, f"{DIRECT_PREFIX}single-{run}")
        single.add(product, rate(size, started))
        started = time.perf_counter()
        direct.put_threaded(src, f"{DIRECT_PREFIX}threaded-{run}")
        notes.threaded.append(rate(size, started))
        empty_bucket(server)
        started = time.perf_counter()
        concurrently(p.port, count, f"concurrent-{run}", each, bench.commit)
        product = rate(each_size * count, started)
        empty_bucket(server)
        started = time.perf_counter()
        in_threads(lambda n: direct.put(each, f"{DIRECT_PREFIX}c-{run}-{n}"), count)
        concurrent.add(product, rate(each_size * count, started))
        empty_bucket(server)
    with receiver(bench, f"s3/rss-{run}", workers=1, storage=storage) as p:
        assert p.proc is not None
        pids = processes(p.proc.pid)
        idle = max(peak_rss_mib(pid) for pid in pids)
        notes.resettable &= all(reset_peak_rss(pid) for pid in pids)
        concurrently(p.port, count, f"rss-{run}", large, bench.commit)
        rss.add(max(peak_rss_mib(pid) for pid in pids), idle)
        empty_bucket(server)
