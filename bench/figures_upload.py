"""Large uploads: one stream against the disk and against nginx, concurrent streams, memory."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from bench.baselines import Unavailable, dd_rate, sha256_rate
from bench.nginx import WebDav
from bench.receivers import (
    Bench,
    clear_stored,
    cpu_seconds,
    in_threads,
    peak_rss_mib,
    processes,
    receiver,
    reset_peak_rss,
    upload,
)
from bench.report import Figure, Target, at_least, spread
from bench.workload import MiB, write_episode_tarball, write_raw
from tests.support import ReceiverProcess


def _size_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def _timed_upload(
    bench: Bench, process: ReceiverProcess, host: str, episode: str, src: Path
) -> float:
    started = time.perf_counter()
    upload(process, host, episode, src, bench.commit)
    return src.stat().st_size / (time.perf_counter() - started) / 1e6


def single_upload(bench: Bench) -> list[Figure]:
    """`upload` (vs the disk) and `nginx` (vs WebDAV PUT + fsync), interleaved per run."""
    sizes = bench.sizes
    label = _size_label(sizes.upload_mib)
    disk = Figure(
        "upload",
        f"one {label} upload, durable, default config (validate=tar)",
        "MB/s",
        "receiver PUT until 201",
        "min(dd conv=fdatasync, sha256)",
        at_least(0.85),
    )
    nginx = Figure(
        "nginx",
        f"the same {label} upload against nginx WebDAV",
        "MB/s",
        "receiver PUT until 201",
        "nginx PUT + fsync file and dir",
        at_least(1.0),
    )
    home = bench.fresh_dir("upload")
    src = home / "episode.tar.zst"
    write_episode_tarball(bench.pool, src, bench.commit, sizes.upload_mib * MiB)
    dd_values: list[float] = []
    sha_values: list[float] = []
    cpu: list[float] = []
    with contextlib.ExitStack() as stack:
        dav: WebDav | None = None
        try:
            dav = stack.enter_context(WebDav(home / "nginx"))
        except Unavailable as error:
            nginx.unavailable = str(error)
        process = stack.enter_context(receiver(bench, "upload/receiver"))
        assert process.proc is not None
        pids = processes(process.proc.pid)
        for run in range(sizes.runs):
            dd_values.append(dd_rate(src, home / "dd.out"))
            sha_values.append(sha256_rate(src))
            before = cpu_seconds(pids)
            product = _timed_upload(bench, process, "bench", f"run-{run}", src)
            cpu.append((cpu_seconds(pids) - before) / (src.stat().st_size / 2**30))
            clear_stored(process)
            disk.add(product, min(dd_values[-1], sha_values[-1]))
            if dav is not None:
                nginx.add(product, dav.put(f"run-{run}.tar.zst", src))
    disk.notes.append(f"dd conv=fdatasync {spread(dd_values)} MB/s")
    disk.notes.append(f"hashlib sha256     {spread(sha_values)} MB/s")
    disk.notes.append(f"receiver CPU (user+sys) {spread(cpu)} s per GiB")
    shutil.rmtree(home)
    return [disk, nginx]


def _in_parallel(
    process: ReceiverProcess, count: int, episode: str, src: Path, commit: str
) -> None:
    """`count` uploads of src at once, from hosts host-00.. (one upload per host)."""
    in_threads(lambda number: upload(process, f"host-{number:02d}", episode, src, commit), count)


def concurrent_uploads(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    count, each = sizes.concurrent_uploads, sizes.concurrent_mib * MiB
    figure = Figure(
        "concurrent",
        f"{count} concurrent {_size_label(sizes.concurrent_mib)} uploads, "
        f"[server] workers = {sizes.workers}",
        "MB/s",
        "aggregate, all 201",
        "min(dd, sha256) of the same bytes",
        at_least(0.85),
    )
    home = bench.fresh_dir("concurrent")
    src = home / "episode.tar.zst"
    size = write_episode_tarball(bench.pool, src, bench.commit, each)
    raw = home / "disk.bin"
    write_raw(bench.pool, raw, size * count)
    cpu: list[float] = []
    with receiver(bench, "concurrent/receiver", workers=sizes.workers) as process:
        assert process.proc is not None
        pids = processes(process.proc.pid)
        for run in range(sizes.runs):
            baseline = min(dd_rate(raw, home / "dd.out"), sha256_rate(raw))
            before = cpu_seconds(pids)
            started = time.perf_counter()
            _in_parallel(process, count, f"run-{run}", src, bench.commit)
            elapsed = time.perf_counter() - started
            cpu.append((cpu_seconds(pids) - before) / (size * count / 2**30))
            clear_stored(process)
            figure.add(size * count / elapsed / 1e6, baseline)
    figure.notes.append(f"receiver CPU (user+sys, all processes) {spread(cpu)} s per GiB")
    shutil.rmtree(home)
    return [figure]


def _rss_target(limit_mib: float, flat: float) -> Target:
    return Target(
        f"<= {limit_mib:g} MiB per process and ratio <= {flat:g}",
        lambda f: max(f.product) <= limit_mib and max(f.ratios) <= flat,
    )


def peak_rss(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    small, large = min(sizes.rss_mib), max(sizes.rss_mib)
    figure = Figure(
        "rss",
        f"receiver peak RSS per process, one upload, {_size_label(small)} to {_size_label(large)}",
        "MiB",
        f"peak RSS, {_size_label(large)} upload",
        f"peak RSS, {_size_label(small)} upload",
        _rss_target(64, 1.10),
    )
    home = bench.fresh_dir("rss")
    files = {}
    for mib in sorted(set(sizes.rss_mib)):
        files[mib] = home / f"episode-{mib}.tar.zst"
        write_episode_tarball(bench.pool, files[mib], bench.commit, mib * MiB)
    with receiver(bench, "rss/receiver") as process:
        assert process.proc is not None
        pids = processes(process.proc.pid)
        idle = max(peak_rss_mib(pid) for pid in pids)
        resettable = True
        for run in range(sizes.runs):
            peaks: dict[int, float] = {}
            for mib, src in files.items():
                resettable &= all(reset_peak_rss(pid) for pid in pids)
                upload(process, "bench", f"run-{run}-{mib}", src, bench.commit)
                peaks[mib] = max(peak_rss_mib(pid) for pid in pids)
                clear_stored(process)
            figure.add(peaks[large], peaks[small])
    figure.notes.append(f"after start, before any upload: {idle:.1f} MiB")
    if not resettable:
        figure.notes.append("VmHWM could not be reset: each value is the peak since start")
    shutil.rmtree(home)
    return [figure]
