"""What the machine does without the product, timed in the same run as the product.

Each returns a rate (MB/s, requests/s) or a time in seconds; missing tools raise
Unavailable with the reason, and the figure says so instead of crashing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from episode_common.durable import fsync_dir

BLOCK = 4 * 1024 * 1024


class Unavailable(Exception):
    """A baseline or product tool is not usable on this machine; str() is the reason."""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Unavailable(f"{tool} not found on PATH")
    return path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_rate(src: Path, dst: Path) -> float:
    """`dd conv=fdatasync` of src to a new file; MB/s."""
    started = time.perf_counter()
    subprocess.run(
        [need("dd"), f"if={src}", f"of={dst}", "bs=4M", "conv=fdatasync", "status=none"],
        check=True,
    )
    elapsed = time.perf_counter() - started
    dst.unlink()
    return src.stat().st_size / elapsed / 1e6


def sha256_rate(src: Path) -> float:
    """hashlib sha256 of the file (from the page cache); MB/s."""
    started = time.perf_counter()
    digest = hashlib.sha256()
    with src.open("rb", buffering=0) as source:
        while block := source.read(BLOCK):
            digest.update(block)
    return src.stat().st_size / (time.perf_counter() - started) / 1e6


def disk_rate(src: Path, scratch: Path) -> tuple[float, str]:
    """min(dd conv=fdatasync, sha256) of the same bytes, and which one it was."""
    dd = dd_rate(src, scratch / "dd.out")
    sha = sha256_rate(src)
    return (dd, f"dd {dd:.0f}") if dd <= sha else (sha, f"sha256 {sha:.0f}")


def small_file_loop(directory: Path, count: int, size: int, threads: int) -> tuple[float, float]:
    """`threads` threads each: write a temp file, fsync, rename. Returns (files/s, p99 s)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        mine: list[float] = []
        for item in range(number, count, threads):
            started = time.perf_counter()
            temp = directory / f".{item}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, directory / f"{item}.bin")
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    shutil.rmtree(directory)
    return count / elapsed, p99(latencies)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def tar_zstd_rate(source: Path, out: Path, input_bytes: int) -> float:
    """`tar -cf - DIR | zstd -3 -T0 > out`, then fsync out (as the packer does); MB/s."""
    tar, zstd = need("tar"), need("zstd")
    started = time.perf_counter()
    with out.open("wb") as sink:
        packer = subprocess.Popen(
            [tar, "-cf", "-", "-C", str(source.parent), source.name], stdout=subprocess.PIPE
        )
        assert packer.stdout is not None
        compressed = subprocess.run(
            [zstd, "-3", "-T0", "-q", "-c"], stdin=packer.stdout, stdout=sink, check=False
        )
        packer.stdout.close()
        if packer.wait() != 0 or compressed.returncode != 0:
            raise Unavailable("tar | zstd failed")
        os.fsync(sink.fileno())
    fsync_dir(out.parent)
    elapsed = time.perf_counter() - started
    out.unlink()
    return input_bytes / elapsed / 1e6


def openssl_rate(files: Sequence[Path]) -> float:
    """`openssl dgst -sha256` over the files; MB/s."""
    openssl = need("openssl")
    started = time.perf_counter()
    subprocess.run(
        [openssl, "dgst", "-sha256", *map(str, files)], check=True, stdout=subprocess.DEVNULL
    )
    elapsed = time.perf_counter() - started
    return sum(path.stat().st_size for path in files) / elapsed / 1e6


def read_seconds(path: Path) -> float:
    """Time to read the whole file (page cache)."""
    started = time.perf_counter()
    with path.open("rb", buffering=0) as source:
        while source.read(BLOCK):
            pass
    return time.perf_counter() - started
