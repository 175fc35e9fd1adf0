"""The packer: deterministic tar, zstd with frame checksum, hash in the same pass, crash-safe."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest

from shipper.pack import (
    PackAborted,
    PackError,
    hash_file,
    pack_directory,
    remove_temporaries,
    zstd_workers,
)

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]


def make_tree(root: Path, order: list[str]) -> None:
    contents = {
        "meta.json": b'{"code_version": {"commit": "' + b"a" * 40 + b'"}}',
        "data/frames.bin": os.urandom(200_000),
        "data/labels.txt": b"cat\n" * 1000,
        "b.txt": b"b",
        "empty/": b"",
        "run.sh": b"#!/bin/sh\n",
    }
    for name in order:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
    if "run.sh" in order:
        (root / "run.sh").chmod(0o700)


def members(tarball: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(zstd.decompress(tarball.read_bytes()))) as tar:
        return tar.getmembers()


def test_pack_is_deterministic_whatever_the_creation_order(tmp_path: Path) -> None:
    names = ["meta.json", "data/frames.bin", "data/labels.txt", "b.txt", "empty/", "run.sh"]
    make_tree(tmp_path / "one", names)
    make_tree(tmp_path / "two", list(reversed(names)))
    (tmp_path / "two" / "data" / "frames.bin").write_bytes(
        (tmp_path / "one" / "data" / "frames.bin").read_bytes()
    )
    for path in (tmp_path / "one").rglob("*"):
        twin = tmp_path / "two" / path.relative_to(tmp_path / "one")
        stamp = path.stat().st_mtime
        os.utime(twin, (stamp, stamp))
    (tmp_path / "out1").mkdir()
    (tmp_path / "out2").mkdir()
    first = pack_directory(tmp_path / "one", tmp_path / "out1", "ep")
    second = pack_directory(tmp_path / "two", tmp_path / "out2", "ep")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    again = pack_directory(tmp_path / "one", tmp_path / "out1", "ep", threads=1)
    assert (
        again.sha256 == pack_directory(tmp_path / "one", tmp_path / "out2", "ep", threads=1).sha256
    )


def test_pack_members_are_relative_sorted_and_normalised(tmp_path: Path) -> None:
    make_tree(
        tmp_path / "src",
        ["meta.json", "data/labels.txt", "data/frames.bin", "b.txt", "empty/", "run.sh"],
    )
    (tmp_path / "out").mkdir()
    packed = pack_directory(tmp_path / "src", tmp_path / "out", "ep")
    listed = members(packed.path)
    names = [m.name for m in listed]
    assert names == [
        "b.txt",
        "data",
        "empty",
        "meta.json",
        "run.sh",
        "data/frames.bin",
        "data/labels.txt",
    ]
    assert all(not m.name.startswith(("/", "..")) for m in listed)
    assert {(m.uid, m.gid, m.uname, m.gname) for m in listed} == {(0, 0, "", "")}
    modes = {m.name: m.mode for m in listed}
    assert modes["run.sh"] == 0o755 and modes["b.txt"] == 0o644 and modes["data"] == 0o755
    with tarfile.open(fileobj=io.BytesIO(zstd.decompress(packed.path.read_bytes()))) as tar:
        extracted = tar.extractfile("data/frames.bin")
        assert extracted is not None
        assert extracted.read() == (tmp_path / "src" / "data" / "frames.bin").read_bytes()


def test_pack_hash_and_size_describe_the_file_written(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json", "data/frames.bin"])
    (tmp_path / "out").mkdir()
    packed = pack_directory(tmp_path / "src", tmp_path / "out", "ep-7")
    data = packed.path.read_bytes()
    assert packed.path == tmp_path / "out" / "ep-7.tar.zst"
    assert packed.sha256 == hashlib.sha256(data).hexdigest()
    assert packed.size_bytes == len(data)
    assert hash_file(packed.path) == packed


def test_pack_sets_the_zstd_frame_checksum(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json", "data/labels.txt"])
    (tmp_path / "out").mkdir()
    data = bytearray(pack_directory(tmp_path / "src", tmp_path / "out", "ep").path.read_bytes())
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    assert data[4] & 0x04, "Content_Checksum_flag in the frame header descriptor"
    data[-1] ^= 0xFF  # the last 4 bytes are the checksum
    with pytest.raises(zstd.ZstdError):
        zstd.decompress(bytes(data))


def _peak_while_packing(tmp_path: Path, name: str, mib: int) -> int:
    source = tmp_path / name
    source.mkdir()
    (source / "meta.json").write_text("{}")
    with open(source / "big.bin", "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(1 << 20))
    (tmp_path / f"{name}-out").mkdir()
    tracemalloc.start()
    try:
        # The daemon's setting (one zstd worker per core). tracemalloc sees the packer's
        # Python buffers: the read buffer and zstd's output chunks queued for the
        # writer; zstd's job buffers and the output mmap are outside it, fixed in size.
        pack_directory(source, tmp_path / f"{name}-out", "ep", threads=0)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_pack_streams_without_holding_the_episode_in_memory(tmp_path: Path) -> None:
    peak = _peak_while_packing(tmp_path, "src", 384)
    # A read buffer and three output chunks (the writer's, the queued one, the one
    # waiting to be queued) plus one being built. A chunk is what zstd's jobs finished
    # since the last call: at most workers + 1 jobs of 8 MiB at level 3, so about
    # 100 MiB at worst with two workers (38-54 MiB measured). A packer holding the
    # episode would need all 384 MiB.
    workers = zstd_workers(0)
    bound = 4 * (workers + 1) * (8 << 20) + (4 << 20)
    assert peak < min(bound, 384 << 19), f"peak allocation {peak} bytes, bound {bound}"


def test_pack_aborted_midway_leaves_no_output_and_no_temporary(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json", "data/frames.bin"])
    (tmp_path / "out").mkdir()
    stop = threading.Event()
    stop.set()
    with pytest.raises(PackAborted):
        pack_directory(tmp_path / "src", tmp_path / "out", "ep", stop=stop)
    assert list((tmp_path / "out").iterdir()) == []


def test_pack_replaces_a_previous_output_atomically(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json", "b.txt"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ep.tar.zst").write_bytes(b"half-written by a crashed run")
    packed = pack_directory(tmp_path / "src", tmp_path / "out", "ep")
    assert zstd.decompress(packed.path.read_bytes())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ep.tar.zst"]


def test_remove_temporaries_deletes_leftovers_of_a_crash(tmp_path: Path) -> None:
    (tmp_path / ".ep.0123.tmp").write_bytes(b"partial")
    (tmp_path / "ep.tar.zst").write_bytes(b"kept")
    assert remove_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ep.tar.zst"]


def test_pack_keeps_relative_symlinks_inside_the_episode(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json", "b.txt"])
    (tmp_path / "src" / "latest").symlink_to("b.txt")
    (tmp_path / "out").mkdir()
    listed = {
        m.name: m for m in members(pack_directory(tmp_path / "src", tmp_path / "out", "e").path)
    }
    assert listed["latest"].issym() and listed["latest"].linkname == "b.txt"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.txt"])
def test_pack_refuses_symlinks_that_leave_the_episode(tmp_path: Path, target: str) -> None:
    make_tree(tmp_path / "src", ["meta.json"])
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "src" / "escape").symlink_to(target)
    (tmp_path / "out").mkdir()
    with pytest.raises(PackError, match="escape"):
        pack_directory(tmp_path / "src", tmp_path / "out", "ep")
    assert list((tmp_path / "out").iterdir()) == []


def test_pack_refuses_special_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", ["meta.json"])
    os.mkfifo(tmp_path / "src" / "pipe")
    (tmp_path / "out").mkdir()
    with pytest.raises(PackError, match="pipe"):
        pack_directory(tmp_path / "src", tmp_path / "out", "ep")
