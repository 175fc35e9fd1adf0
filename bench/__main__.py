"""`python -m bench [--size-mib N] [--runs K]`: one large durable upload vs local write+hash.

Baseline (same run, same disk): the same bytes written to a file, fsynced, and
sha256-hashed by hashlib. Product: a real receiver (validate = "tar") receiving
the tarball over loopback and answering 201. Also reports the server's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support import ReceiverProcess, make_repo, receiver_config, write_toml

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

BLOCK = 4 * 1024 * 1024


def make_episode(path: Path, commit: str, size: int) -> None:
    """A .tar.zst of `size` bytes of incompressible data plus meta.json, streamed."""
    options = {
        zstd.CompressionParameter.compression_level: 1,
        zstd.CompressionParameter.checksum_flag: 1,
    }
    with zstd.ZstdFile(path, "w", options=options) as out:
        with tarfile.open(fileobj=out, mode="w|") as tar:
            meta = f'{{"code_version": {{"commit": "{commit}"}}}}'.encode()
            info = tarfile.TarInfo("meta.json")
            info.size = len(meta)
            import io

            tar.addfile(info, io.BytesIO(meta))
            info = tarfile.TarInfo("data/blob.bin")
            info.size = size
            tar.addfile(info, _RandomReader(size))


class _RandomReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def baseline(src: Path, dst: Path) -> float:
    """Write + fsync + sha256 of the same bytes; returns MB/s."""
    started = time.perf_counter()
    sha = hashlib.sha256()
    with src.open("rb", buffering=0) as source, dst.open("wb", buffering=0) as sink:
        while block := source.read(BLOCK):
            sha.update(block)
            sink.write(block)
        os.fsync(sink.fileno())
    elapsed = time.perf_counter() - started
    dst.unlink()
    return src.stat().st_size / elapsed / 1e6


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as source:
        while block := source.read(1024 * 1024):
            yield block


def upload(receiver: ReceiverProcess, src: Path, commit: str, episode: str) -> float:
    started = time.perf_counter()
    response = httpx.put(
        f"{receiver.url}/episodes/bench/{episode}",
        content=_chunks(src),
        headers={"X-Code-Commit": commit, "Content-Length": str(src.stat().st_size)},
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise SystemExit(f"upload failed: {response.status_code} {response.text}")
    return src.stat().st_size / elapsed / 1e6


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summary(values: list[float]) -> str:
    return (
        f"min {min(values):8.2f}  median {statistics.median(values):8.2f}  max {max(values):8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (same disk as data)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="episode-bench-") as scratch:
        root = Path(scratch)
        commit = make_repo(root / "repo", commits=1)[0]
        src = root / "episode.tar.zst"
        make_episode(src, commit, args.size_mib * 1024 * 1024)
        config = receiver_config(root, root / "repo")
        receiver = ReceiverProcess(write_toml(root / "receiver.toml", config)).start()
        assert receiver.proc is not None
        base, product = [], []
        try:
            for run in range(args.runs):
                base.append(baseline(src, root / "baseline.bin"))
                product.append(upload(receiver, src, commit, f"run-{run}"))
                for stored in (root / "data" / "episodes" / "bench").glob("*"):
                    stored.unlink()
            rss = peak_rss_mib(receiver.proc.pid)
        finally:
            receiver.stop()
    size = src.stat().st_size if src.exists() else args.size_mib * 2**20
    print(f"one upload of {size / 2**20:.0f} MiB, {args.runs} runs, MB/s")
    print(f"  baseline write+fsync+sha256  {summary(base)}")
    print(f"  receiver PUT, validate=tar   {summary(product)}")
    ratios = [p / b for p, b in zip(product, base, strict=True)]
    print(f"  ratio (same run)             {summary(ratios)}")
    print(f"  receiver peak RSS            {rss:.1f} MiB")


if __name__ == "__main__":
    main()
