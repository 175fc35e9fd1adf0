"""DirectOutput: the packer's page-cache-bypassing writer gives back exactly the bytes."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipper.direct_output import ALIGNMENT, BUFFER_BYTES, DirectOutput


def direct_io_works(directory: Path) -> bool:
    """Probe, independently of DirectOutput, whether this file system takes O_DIRECT writes."""
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    block = mmap.mmap(-1, ALIGNMENT)
    try:
        return os.write(fd, block) == ALIGNMENT
    except OSError:
        return False
    finally:
        block.close()
        os.close(fd)
        probe.unlink()


@pytest.fixture
def out_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def pieces(total: int, sizes: list[int]) -> Iterator[bytes]:
    """`total` random bytes cut in pieces of the given sizes, cycled."""
    data = os.urandom(total)
    start = 0
    turn = 0
    while start < total:
        size = sizes[turn % len(sizes)]
        yield data[start : start + size]
        start += size
        turn += 1


@pytest.mark.parametrize(
    "total",
    [
        0,
        1,
        ALIGNMENT,
        ALIGNMENT + 1,
        BUFFER_BYTES - 1,
        BUFFER_BYTES,
        BUFFER_BYTES + 1,
        3 * BUFFER_BYTES + 5000,
    ],
)
def test_every_byte_arrives_in_order_whatever_the_tail(
    tmp_path: Path, out_fd: int, total: int
) -> None:
    expected = bytearray()
    output = DirectOutput(out_fd)
    assert output.direct == direct_io_works(tmp_path)
    for piece in pieces(total, [1, 4095, 700_000, 5 << 20, 12345]):
        output.write(piece)
        expected += piece
    output.close()
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)
    assert not fcntl.fcntl(out_fd, fcntl.F_GETFL) & os.O_DIRECT, "flags restored"


def test_direct_false_writes_through_the_page_cache(tmp_path: Path, out_fd: int) -> None:
    data = os.urandom(2 * BUFFER_BYTES + 77)
    output = DirectOutput(out_fd, direct=False)
    assert not output.direct
    assert not fcntl.fcntl(out_fd, fcntl.F_GETFL) & os.O_DIRECT
    output.write(memoryview(data))
    output.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_write_refused_with_einval_falls_back_to_buffered(
    tmp_path: Path, out_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: some file systems accept O_DIRECT in F_SETFL and refuse the write
    # itself; none here does, so os.write is wrapped to refuse while O_DIRECT is set.
    real_write = os.write

    def refusing_direct(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_direct)
    data = os.urandom(BUFFER_BYTES + 9000)
    output = DirectOutput(out_fd, direct=True)
    output.write(data)
    assert not output.direct, "switched to buffered writes on the first refusal"
    output.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_short_direct_write_is_finished_buffered(
    tmp_path: Path, out_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: a short O_DIRECT write (the device ran out of room mid-request) is
    # rare and not reproducible on demand; os.write is wrapped to write one block once.
    real_write = os.write
    shortened: list[bool] = []

    def short_once(fd: int, data: bytes | memoryview) -> int:
        if not shortened and len(data) > ALIGNMENT:
            shortened.append(True)
            return real_write(fd, memoryview(data)[:ALIGNMENT])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_once)
    data = os.urandom(3 * BUFFER_BYTES + 123)
    output = DirectOutput(out_fd, direct=True)
    output.write(data)
    output.close()
    assert shortened
    assert (tmp_path / "out.bin").read_bytes() == data


def test_other_write_errors_propagate_and_abandon_releases(
    out_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated ENOSPC; the real full-disk case is in tests/reliability/test_full_disk.py.
    def no_space(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    output = DirectOutput(out_fd)
    with pytest.raises(OSError) as raised:
        output.write(os.urandom(BUFFER_BYTES))
    assert raised.value.errno == errno.ENOSPC
    output.abandon()
    output.abandon()  # idempotent: the packer's error path may call it after close()
    assert not fcntl.fcntl(out_fd, fcntl.F_GETFL) & os.O_DIRECT
