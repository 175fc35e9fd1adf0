"""A full disk, for real: data_dir on a small tmpfs that the test mounts (root in CI).

Uploads that do not fit get 507 and leave nothing; when space returns uploads
succeed again. An index append that fails (the kernel's ENOSPC, a short write,
EIO) leaves the index byte-identical, and the next append is clean. The shipper's
packer surfaces ENOSPC and leaves no partial tarball.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from receiver.storage import DurabilityError
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.rows import IndexRow, encode_row, new_row
from shipper.pack import pack_directory
from tests.reliability.conftest import HEADER, Receiver, episode, sha256
from tests.reliability.invariants import check_invariants, read_state
from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
PAGE = 4096
EXIT_DURABILITY = 70


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at tmp_path/data, unmounted afterwards. Never skipped."""
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            "the full-disk tests mount a small tmpfs and need root (or CAP_SYS_ADMIN); "
            f"`mount -t tmpfs` failed: {result.stderr.strip() or result.returncode}"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a ballast file so that only `leave` bytes stay free."""
    ballast = path / "ballast"
    size = free_bytes(path) - leave
    with ballast.open("wb") as handle:
        handle.write(b"\0" * size)
    assert free_bytes(path) == leave
    return ballast


def pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def view_bytes(data_dir: Path) -> int:
    """Disk space held by the index's view (its write-ahead log grows with recorded marks)."""
    return sum(path.stat().st_blocks * 512 for path in data_dir.glob("index.view.sqlite3*"))


def test_uploads_that_do_not_fit_get_507_and_leave_nothing_until_space_returns(
    small_fs: Path, tmp_path: Path, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver = Receiver(tmp_path, gate_repo[0])
    try:
        receiver.start()
        small = episode(commit, size=16 * 1024, seed=1)
        assert receiver.put("h", "small", small, commit).status_code == 201
        acked = {("h", "small"): sha256(small)}
        ballast = fill(small_fs, leave=1 * MiB)
        view_before = view_bytes(small_fs)

        big = episode(commit, size=2 * MiB, seed=2)  # incompressible: 2 MiB on disk
        declared = receiver.put("h", "big", big, commit)  # Content-Length: refused up front
        assert declared.status_code == 507, declared.text
        assert declared.json()["error"] == "insufficient-storage"
        assert int(declared.headers["retry-after"]) > 0
        streamed = httpx.put(  # chunked: the disk fills while streaming
            f"{receiver.url}/episodes/h/big-chunked",
            content=chunked(big),
            headers={HEADER: commit},
            timeout=30,
        )
        assert streamed.status_code == 507, streamed.text
        assert streamed.json()["error"] == "insufficient-storage"
        # The partial temp file is gone; only the index view's log grew (the rejections).
        assert free_bytes(small_fs) == 1 * MiB - (view_bytes(small_fs) - view_before)
        check_invariants(small_fs, acked)

        ballast.unlink()  # space returns; no restart needed
        assert receiver.put("h", "big", big, commit).status_code == 201
        again = httpx.put(
            f"{receiver.url}/episodes/h/big-chunked",
            content=chunked(big),
            headers={HEADER: commit},
            timeout=30,
        )
        assert again.status_code == 201, again.text
        acked |= {("h", "big"): sha256(big), ("h", "big-chunked"): sha256(big)}
        check_invariants(small_fs, acked)
    finally:
        receiver.kill()


def test_index_append_hitting_enospc_exits_70_and_the_restart_indexes_the_file(
    small_fs: Path, tmp_path: Path, gate_repo: tuple[Path, str]
) -> None:
    """The tarball fits exactly; the index's first page does not: no 201, exit 70."""
    _, commit = gate_repo
    receiver = Receiver(tmp_path, gate_repo[0])
    try:
        receiver.start()
        body = episode(commit, size=1 * MiB, seed=3)
        ballast = fill(small_fs, leave=pages(len(body)))
        with pytest.raises(httpx.TransportError):
            receiver.put("h", "e", body, commit)
        assert receiver.wait_dead() == EXIT_DURABILITY
        assert "durability failure" in receiver.log()
        state = read_state(small_fs)
        assert state.rows == {} and state.torn_tail == b""  # no half row
        assert ("h", "e") in state.files  # installed, its temp name kept for recovery

        # Still full: recovery cannot append the row; one line, exit 70 (systemd restarts).
        refused = serve_until_exit(receiver)
        assert refused.returncode == EXIT_DURABILITY, refused.stderr
        assert "Traceback" not in refused.stderr
        assert "recovery failed" in refused.stderr and "No space left" in refused.stderr

        ballast.unlink()
        receiver.start()
        check_invariants(small_fs, {("h", "e"): sha256(body)})
        retry = receiver.put("h", "e", body, commit)
        assert retry.status_code == 200, retry.text
    finally:
        receiver.kill()


def test_torn_index_tail_on_a_full_disk_stops_the_start_with_one_line_until_space_returns(
    small_fs: Path, tmp_path: Path, gate_repo: tuple[Path, str]
) -> None:
    """Cutting a torn tail keeps a copy of it, which needs space; no traceback, exit 70."""
    _, commit = gate_repo
    receiver = Receiver(tmp_path, gate_repo[0])
    try:
        receiver.start()
        body = episode(commit, seed=6)
        assert receiver.put("h", "e", body, commit).status_code == 201
        receiver.stop()
        index = small_fs / "index.jsonl"
        clean = index.read_bytes()
        with index.open("ab") as handle:
            handle.write(clean[: len(clean) // 2])  # a writer died mid-append
        ballast = fill(small_fs, leave=0)
        refused = serve_until_exit(receiver)
        assert refused.returncode == EXIT_DURABILITY, refused.stderr
        assert "Traceback" not in refused.stderr and "recovery failed" in refused.stderr
        assert index.read_bytes().startswith(clean)  # nothing cut without its copy

        ballast.unlink()
        receiver.start()
        check_invariants(small_fs, {("h", "e"): sha256(body)})
        assert index.read_bytes() == clean
        (side,) = small_fs.glob("index.jsonl.torn-*")
        assert side.read_bytes() == clean[: len(clean) // 2]
    finally:
        receiver.kill()


def serve_until_exit(receiver: Receiver) -> subprocess.CompletedProcess[str]:
    """Run `serve` in the foreground; for starts that must fail."""
    return subprocess.run(
        [sys.executable, "-m", "receiver", "serve", "--config", str(receiver.config_path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=30,
    )


def filler(number: int, length: int) -> IndexRow | None:
    """Row `number`, encoding to exactly `length` bytes (id length and commit vary), if any."""
    prefix = f"p{number:05d}"
    for commit in (None, "a" * 40, "b" * 64):
        pad = length - len(encode_row(new_row("h", prefix, "0" * 64, 1, commit)))
        if 0 <= pad <= 128 - len(prefix):
            return new_row("h", prefix + "q" * pad, "0" * 64, 1, commit)
    return None


def fill_index_to(index: JsonlCatalogue, room: int) -> None:
    """Append rows until the index's last page has exactly `room` bytes left."""
    shortest = len(encode_row(new_row("h", "p00000", "0" * 64, 1, None)))
    number = 0
    while (left := (PAGE - index.path.stat().st_size - room) % PAGE) > 0:
        # One row if it can be that long, else one that leaves room for another.
        row = filler(number, left) or filler(number, min(left - shortest, shortest + 100))
        assert row is not None, left
        assert index.append_if_absent(row)[1]
        number += 1


@pytest.mark.parametrize("room", [0, 100])
def test_index_append_on_a_full_disk_leaves_the_index_byte_identical(
    room: int, small_fs: Path
) -> None:
    """room 0: the kernel refuses the write; room 100: it writes 100 bytes (a short write)."""
    index = JsonlCatalogue(small_fs / "index.jsonl")
    index.append_if_absent(new_row("h", "first", "1" * 64, 1, None))
    fill_index_to(index, room)
    row = new_row("h", "x" * 100, "2" * 64, 2, "a" * 40)
    before = index.path.read_bytes()
    ballast = fill(small_fs, leave=0)

    with pytest.raises(DurabilityError):
        index.append_if_absent(row)
    assert index.path.read_bytes() == before
    assert index.lookup(*row.key) is None

    ballast.unlink()
    assert index.append_if_absent(row) == (row, True)
    assert index.path.read_bytes() == before + encode_row(row)
    assert read_state(small_fs).rows[row.key] == row
    assert list(small_fs.glob("index.jsonl.torn-*")) == []


def test_a_view_update_on_a_full_disk_keeps_the_durable_row_and_catches_up(
    small_fs: Path,
) -> None:
    """The row fits in index.jsonl's last page, the view's log cannot grow: the append
    stands (the file wins), lookups see it, and the view catches up once there is room."""
    index = JsonlCatalogue(small_fs / "index.jsonl")
    index.append_if_absent(new_row("h", "first", "1" * 64, 1, None))
    row = new_row("h", "on-full", "2" * 64, 2, "a" * 40)
    fill_index_to(index, room=len(encode_row(row)))
    ballast = fill(small_fs, leave=0)

    assert index.append_if_absent(row) == (row, True)
    assert index.view.position().offset < index.path.stat().st_size  # the view is behind
    assert index.lookup(*row.key) == row
    assert index.append_if_absent(row) == (row, False)

    ballast.unlink()
    later = new_row("h", "later", "3" * 64, 3, None)
    assert index.append_if_absent(later) == (later, True)
    assert index.view.position().offset == index.path.stat().st_size
    rows = read_state(small_fs).rows
    other = JsonlCatalogue(index.path)
    assert other.count() == len(rows)
    assert other.lookup(*row.key) == row and other.lookup(*later.key) == later
    assert other.host_summaries()["h"].episodes == len(rows)
    index.close()
    other.close()


def _write_then(code: int, real: Callable[[int, bytes], int], line: bytes) -> object:
    def fake_write(fd: int, data: bytes) -> int:
        if bytes(data) != line:
            return real(fd, data)
        real(fd, data[: len(data) // 3])  # part of it landed, then the device failed
        raise OSError(code, os.strerror(code))

    return fake_write


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EDQUOT])
def test_index_write_error_leaves_no_torn_row(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = JsonlCatalogue(tmp_path / "index.jsonl")
    index.append_if_absent(new_row("h", "first", "1" * 64, 1, None))
    before = index.path.read_bytes()
    row = new_row("h", "second", "2" * 64, 2, None)
    monkeypatch.setattr(
        "receiver.storage.jsonl.os.write", _write_then(code, os.write, encode_row(row))
    )
    with pytest.raises(DurabilityError):
        index.append_if_absent(row)
    monkeypatch.undo()
    assert index.path.read_bytes() == before
    # A second reader never sees the failed row, and the next append is clean.
    other = JsonlCatalogue(index.path)
    other.load()
    assert other.lookup("h", "second") is None
    assert index.append_if_absent(row) == (row, True)
    assert index.path.read_bytes() == before + encode_row(row)


def test_receiver_killed_while_the_disk_is_full_restarts_and_serves(
    small_fs: Path, tmp_path: Path, gate_repo: tuple[Path, str]
) -> None:
    """A crash on a full disk: recovery needs no free space to start."""
    _, commit = gate_repo
    receiver = Receiver(tmp_path, gate_repo[0])
    try:
        receiver.start()
        first = episode(commit, size=8 * 1024, seed=4)
        assert receiver.put("h", "first", first, commit).status_code == 201
        fill(small_fs, leave=0)
        assert receiver.process is not None and receiver.process.proc is not None
        receiver.process.proc.send_signal(signal.SIGKILL)
        receiver.wait_dead()
        receiver.start()
        assert receiver.put("h", "first", first, commit).status_code == 200
        # Closing the index's view at restart may hand back its write-ahead log's space.
        (small_fs / "more-ballast").write_bytes(b"\0" * free_bytes(small_fs))
        refused = receiver.put("h", "second", episode(commit, seed=5), commit)
        assert refused.status_code == 507
        check_invariants(small_fs, {("h", "first"): sha256(first)})
    finally:
        receiver.kill()


def test_packing_onto_a_full_disk_fails_with_enospc_and_leaves_nothing(
    small_fs: Path, tmp_path: Path
) -> None:
    # The packer writes with O_DIRECT where it can (tmpfs takes it on current kernels):
    # the kernel's ENOSPC must surface, and the temp file must go.
    source = tmp_path / "episode"
    source.mkdir()
    (source / "meta.json").write_text("{}")
    (source / "frames.bin").write_bytes(os.urandom(16 * MiB))
    with pytest.raises(OSError) as raised:
        pack_directory(source, small_fs, "ep-1")
    assert raised.value.errno == errno.ENOSPC
    assert list(small_fs.iterdir()) == []
    assert free_bytes(small_fs) >= 7 * MiB, "the partial output was removed"
    (source / "frames.bin").write_bytes(os.urandom(2 * MiB))
    packed = pack_directory(source, small_fs, "ep-1")
    assert packed.size_bytes > 2 * MiB
    assert [p.name for p in small_fs.iterdir()] == ["ep-1.tar.zst"]
