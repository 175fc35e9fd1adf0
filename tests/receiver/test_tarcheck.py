"""receiver.tarcheck on real tarballs: valid episodes, each rejection, bounded memory, threads."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from receiver.config import FilesystemStorageConfig, KiB, MiB, StorageConfig
from receiver.errors import InvalidTarball
from receiver.tarcheck import (
    INLINE_BYTES,
    StreamValidator,
    TarSummary,
    read_meta_commit,
    validate_stream,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

COMMIT = "0123456789abcdef0123456789abcdef01234567"
META = json.dumps({"episode_id": "ep-1", "code_version": {"commit": COMMIT}}).encode()
RANDOM = os.urandom(256 * KiB)
LOG = b"".join(b"%d,0.%06d,ok\n" % (i, i * 7919 % 1000000) for i in range(40_000))


def storage(validate: str = "tar", **limits: int) -> StorageConfig:
    return FilesystemStorageConfig(data_dir=Path("unused"), validate=validate, **limits)  # type: ignore[arg-type]


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "meta.json"
    return info, data


def build_tar(*entries: tuple[tarfile.TarInfo, bytes], meta: bytes | None = META) -> bytes:
    """An episode tar: meta.json (unless meta is None), a data dir with two files, then entries."""
    standard = [entry("data", tarfile.DIRTYPE), entry("data/camera.bin", data=RANDOM)]
    standard.append(entry("data/log.csv", data=LOG))
    if meta is not None:
        standard.insert(0, entry("meta.json", data=meta))
    return build_tar_of(*standard, *entries)


def build_tar_of(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def compress(data: bytes, *, window_log: int | None = None) -> bytes:
    """One zstd frame with a checksum; with window_log, streamed so the window is declared."""
    options: dict[int, int] = {zstd.CompressionParameter.checksum_flag: 1}
    if window_log is None:
        return zstd.compress(data, options=options)
    options[zstd.CompressionParameter.window_log] = window_log
    compressor = zstd.ZstdCompressor(options=options)
    return compressor.compress(data) + compressor.flush()


def chunked(data: bytes, sizes: tuple[int, ...] = (65536,)) -> Iterator[bytes]:
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        yield data[position : position + size]
        position, turn = position + size, turn + 1


def rejection(body: bytes, config: StorageConfig | None = None) -> str:
    with pytest.raises(InvalidTarball) as caught:
        validate_stream(chunked(body), config or storage())
    return str(caught.value.detail)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1 GiB of zeros as a few KiB of zstd, compressed a MiB at a time."""
    compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
    zeros = bytes(MiB)
    parts = [compressor.compress(zeros) for _ in range(1024)]
    return b"".join(parts) + compressor.flush()


def test_valid_archive_returns_commit_members_and_bytes() -> None:
    raw = build_tar()
    summary = validate_stream(chunked(compress(raw)), storage())
    assert summary == TarSummary(meta_commit=COMMIT, members=4, unpacked_bytes=len(raw))


def test_meta_json_under_dot_slash_accepted() -> None:
    raw = build_tar(entry(".", tarfile.DIRTYPE), entry("./meta.json", data=META), meta=None)
    assert validate_stream([compress(raw)], storage()).meta_commit == COMMIT


MISSING = "no meta.json at the top or under the single top-level directory"


def episode_dir_tar(top: str, *extra: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """The layout `tar -C spool -cf - <top>` makes: everything inside one directory."""
    members = [entry(top, tarfile.DIRTYPE), entry(f"{top}/meta.json", data=META)]
    members += [entry(f"{top}/data", tarfile.DIRTYPE), entry(f"{top}/data/log.csv", data=LOG)]
    return build_tar_of(*members, *extra)


def test_meta_json_at_the_top_accepted() -> None:
    assert validate_stream([compress(build_tar())], storage()).meta_commit == COMMIT


def test_meta_json_in_one_top_level_directory_accepted() -> None:
    summary = validate_stream([compress(episode_dir_tar("ep-0001"))], storage())
    assert summary.meta_commit == COMMIT
    assert summary.members == 4


def test_meta_json_in_one_dot_slash_directory_accepted() -> None:
    raw = build_tar_of(entry("./ep-1", tarfile.DIRTYPE), entry("./ep-1/meta.json", data=META))
    assert validate_stream([compress(raw)], storage()).meta_commit == COMMIT


def test_meta_json_with_two_top_level_directories_rejected() -> None:
    raw = episode_dir_tar("ep-1", entry("ep-2", tarfile.DIRTYPE), entry("ep-2/x", data=b"x"))
    assert rejection(compress(raw)) == f"{MISSING} (the archive has several top-level entries)"


def test_meta_json_in_each_of_two_directories_rejected() -> None:
    raw = episode_dir_tar("a", entry("b", tarfile.DIRTYPE), entry("b/meta.json", data=META))
    assert rejection(compress(raw)) == f"{MISSING} (the archive has several top-level entries)"


def test_meta_json_two_levels_down_rejected() -> None:
    raw = build_tar_of(entry("a", tarfile.DIRTYPE), entry("a/b/meta.json", data=META))
    assert rejection(compress(raw)) == f"{MISSING} (a/b/meta.json is too deep)"


def test_missing_meta_json_rejected() -> None:
    assert rejection(compress(build_tar(meta=None))) == MISSING


def test_meta_json_not_json_rejected() -> None:
    assert rejection(compress(build_tar(meta=b"{commit: nope"))) == "meta.json is not valid JSON"


@pytest.mark.parametrize("meta", [{}, {"code_version": "abc"}, []])
def test_meta_json_without_commit_is_reported_as_none(meta: object) -> None:
    """Whether that is allowed depends on the gate; the ingest rules decide (400 with it on)."""
    summary = validate_stream([compress(build_tar(meta=json.dumps(meta).encode()))], storage())
    assert summary.meta_commit is None


def test_meta_json_commit_not_a_string_rejected() -> None:
    raw = build_tar(meta=json.dumps({"code_version": {"commit": 7}}).encode())
    assert rejection(compress(raw)) == "meta.json code_version.commit is not a string"


def test_meta_json_over_one_mib_rejected() -> None:
    big = json.dumps({"code_version": {"commit": COMMIT}, "pad": "x" * MiB}).encode()
    assert rejection(compress(build_tar(meta=big))) == "meta.json is larger than 1 MiB"


def test_meta_json_directory_rejected() -> None:
    directory = entry("meta.json", tarfile.DIRTYPE)
    assert rejection(compress(build_tar(directory, meta=None))) == "meta.json is not a regular file"


def test_second_meta_json_at_the_top_rejected() -> None:
    detail = rejection(compress(build_tar(entry("./meta.json", data=META))))
    assert detail == "more than one meta.json at the top of the archive"


def test_second_meta_json_in_the_directory_rejected() -> None:
    detail = rejection(compress(episode_dir_tar("ep-1", entry("ep-1/meta.json", data=META))))
    assert detail == "more than one ep-1/meta.json"


def test_absolute_member_rejected() -> None:
    detail = rejection(compress(build_tar(entry("/etc/passwd", data=b"x"))))
    assert detail == "member '/etc/passwd' is an absolute path"


@pytest.mark.parametrize("name", ["../x", "a/../../b", "data/.."])
def test_dotdot_member_rejected(name: str) -> None:
    assert (
        rejection(compress(build_tar(entry(name, data=b"x"))))
        == f"member {name!r} escapes the archive"
    )


@pytest.mark.parametrize(
    ("kind", "word"),
    [
        (tarfile.SYMTYPE, "symlink"),
        (tarfile.LNKTYPE, "hardlink"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_links_devices_and_fifos_rejected(kind: bytes, word: str) -> None:
    assert f"'data/odd' is a {word}" in rejection(compress(build_tar(entry("data/odd", kind))))


def test_unknown_member_type_rejected() -> None:
    detail = rejection(compress(build_tar(entry("data/odd", b"V"))))
    assert (
        detail
        == "member 'data/odd' is a special member (type V); only files and directories allowed"
    )


def test_too_many_members_rejected() -> None:
    body = compress(build_tar(*(entry(f"data/{i}", data=b"x") for i in range(10))))
    assert validate_stream([body], storage(max_members=14)).members == 14
    assert rejection(body, storage(max_members=13)) == "more than 13 members"


def test_many_members_validated_in_bounded_memory() -> None:
    body = compress(build_tar(*(entry(f"data/{i}") for i in range(10_000))))
    tracemalloc.start()
    try:
        assert validate_stream([body], storage()).members == 10_004
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * MiB  # keeping every TarInfo, as tarfile does by default: ~7 MiB


def test_zstd_bomb_rejected_by_size_cap_in_bounded_memory(bomb: bytes) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB
    tracemalloc.start()
    try:
        detail = rejection(bomb, storage("zstd", max_unpacked_bytes=256 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB - before
    assert detail == f"decompressed size exceeds {256 * MiB} bytes"
    assert peak < 8 * MiB  # Python objects: a couple of 1 MiB pieces at a time
    assert grown < 64 * MiB  # the whole process, libzstd's buffers included


def test_window_larger_than_max_window_bytes_rejected() -> None:
    body = compress(build_tar(), window_log=20)
    assert "window" in rejection(body, storage(max_window_bytes=512 * KiB))
    # floor(log2(1.5 MiB)) = 20: a 1 MiB window is within the cap.
    assert validate_stream([body], storage(max_window_bytes=3 * 512 * KiB)).meta_commit == COMMIT


def test_truncated_stream_rejected_at_every_cut_point() -> None:
    body = compress(build_tar())
    # In the magic, in the frame header, mid-frame, just before and inside the 4-byte checksum.
    for cut in (2, 4, 9, len(body) // 2, len(body) - 4, len(body) - 1):
        assert rejection(body[:cut]) == "truncated zstd stream", cut
    second = compress(b"more")
    assert rejection(body + second[:5]) == "truncated zstd stream"


def test_corrupted_byte_rejected() -> None:
    body = compress(build_tar())
    for position in (0, 20, len(body) // 3, len(body) // 2, len(body) - 2):
        damaged = bytearray(body)
        damaged[position] ^= 0x40
        with pytest.raises(InvalidTarball):
            validate_stream([bytes(damaged)], storage())


def test_corruption_inside_stored_data_caught_by_frame_checksum() -> None:
    body = compress(RANDOM)  # incompressible: stored verbatim, so only the checksum can tell
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 1
    assert "checksum" in rejection(bytes(damaged), storage("zstd"))


def test_empty_body_rejected() -> None:
    assert rejection(b"") == "empty body: no zstd frame"
    assert rejection(b"", storage("zstd")) == "empty body: no zstd frame"


def test_garbage_rejected() -> None:
    assert rejection(b"PK\x03\x04 this is a zip, not zstd").startswith("zstd: ")


def test_tar_truncated_inside_a_complete_zstd_stream_rejected() -> None:
    raw = build_tar()
    assert rejection(compress(raw[: len(raw) // 2])).startswith("tar: ")


def test_not_a_tar_rejected_in_tar_mode() -> None:
    assert rejection(compress(b"hello" * 1000)).startswith("tar: ")


def test_multiple_frames_and_skippable_frames_accepted() -> None:
    raw = build_tar()
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"pad"
    cuts = (0, 700, 300_000, len(raw))
    frames = [compress(raw[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    body = skippable + frames[0] + skippable + frames[1] + frames[2]
    summary = validate_stream(chunked(body, (1000, 3)), storage())
    assert summary == TarSummary(meta_commit=COMMIT, members=4, unpacked_bytes=len(raw))


def test_flood_of_empty_frames_rejected_quickly() -> None:
    empty_frame = zstd.compress(b"")
    started = time.monotonic()
    assert (
        rejection(empty_frame * 50_000, storage("zstd"))
        == "zstd: 1001 frames for 0 bytes of output"
    )
    assert time.monotonic() - started < 1


def test_zstd_mode_accepts_a_non_tar_stream_and_counts_bytes() -> None:
    summary = validate_stream([compress(LOG)], storage("zstd"))
    assert summary == TarSummary(meta_commit=None, members=0, unpacked_bytes=len(LOG))


def test_none_mode_accepts_garbage() -> None:
    assert validate_stream([b"garbage"], storage("none")) == TarSummary(None, 0, 0)
    validator = StreamValidator(storage("none"))
    validator.feed(b"garbage")
    assert validator.failed is None
    assert validator.finish() == TarSummary(None, 0, 0)


def outcome(run: Callable[[], TarSummary]) -> TarSummary | str:
    try:
        return run()
    except InvalidTarball as error:
        return f"invalid: {error.detail}"


def feed_from_thread(validator: StreamValidator, chunks: Iterator[bytes]) -> TarSummary:
    def produce() -> None:
        for chunk in chunks:
            validator.feed(chunk)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=30)
    assert not producer.is_alive()
    return validator.finish()


@pytest.mark.parametrize(
    "body",
    [
        compress(build_tar()),
        compress(build_tar(entry("../x", data=b"x"))),
        compress(build_tar())[:-3],
        compress(build_tar(meta=None)),
        b"garbage" * 1000,
    ],
    ids=["valid", "dotdot", "truncated", "no-meta", "garbage"],
)
@pytest.mark.parametrize("inline_bytes", [0, INLINE_BYTES], ids=["worker", "at-finish"])
def test_stream_validator_fed_odd_chunks_agrees_with_validate_stream(
    body: bytes, inline_bytes: int
) -> None:
    expected = outcome(lambda: validate_stream([body], storage()))
    validator = StreamValidator(storage(), queue_chunks=3, inline_bytes=inline_bytes)
    sizes = (1, 7, 333, 4093, 65537)
    assert outcome(lambda: feed_from_thread(validator, chunked(body, sizes))) == expected


def test_feed_after_failure_returns_at_once() -> None:
    validator = StreamValidator(storage(), queue_chunks=1)
    chunk = os.urandom(64 * KiB)  # not zstd: the worker fails on the first chunk
    started = time.monotonic()
    for _ in range(20_000):  # 1.25 GiB offered; a stuck or busy consumer would take long
        validator.feed(chunk)
    assert time.monotonic() - started < 5
    assert validator.failed is not None
    with pytest.raises(InvalidTarball):
        validator.finish()


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread not in before]


def test_abort_stops_an_idle_worker() -> None:
    before = set(threading.enumerate())
    validator = StreamValidator(storage(), inline_bytes=0)
    validator.feed(compress(build_tar())[:1000])  # the worker now waits for more input
    assert new_threads(before)
    validator.abort()
    validator.abort()  # idempotent
    assert not new_threads(before)
    assert validator.failed is None
    with pytest.raises(InvalidTarball, match="aborted"):
        validator.finish()


def test_abort_stops_a_busy_worker_promptly(bomb: bytes) -> None:
    before = set(threading.enumerate())
    # Default cap 256 GiB: all 16 GiB get inflated.
    validator = StreamValidator(storage("zstd"), inline_bytes=0)
    validator.feed(bomb * 16)  # one chunk: the worker never returns to the queue for seconds
    time.sleep(0.05)
    assert new_threads(before)
    started = time.monotonic()
    validator.abort()
    assert time.monotonic() - started < 0.5
    assert not new_threads(before)


def test_a_small_body_is_checked_by_finish_without_a_thread() -> None:
    body = compress(build_tar())
    assert len(body) <= INLINE_BYTES
    before = set(threading.enumerate())
    validator = StreamValidator(storage())
    for chunk in chunked(body):
        validator.feed(chunk)
    assert not new_threads(before)
    assert validator.failed is None  # known only at finish()
    summary = validator.finish()
    assert summary.meta_commit == COMMIT
    assert summary == validate_stream([body], storage())


def test_a_small_bad_body_is_rejected_by_finish() -> None:
    validator = StreamValidator(storage())
    validator.feed(compress(build_tar(entry("/etc/passwd", data=b"x"))))
    with pytest.raises(InvalidTarball, match="absolute"):
        validator.finish()


def test_a_body_past_inline_bytes_moves_to_a_worker() -> None:
    body = compress(build_tar())
    before = set(threading.enumerate())
    validator = StreamValidator(storage(), inline_bytes=1000)
    chunks = list(chunked(body, (700,)))
    validator.feed(chunks[0])
    assert not new_threads(before)
    for chunk in chunks[1:]:
        validator.feed(chunk)
    assert new_threads(before)
    assert validator.finish() == validate_stream([body], storage())
    assert not new_threads(before)


def test_abort_stops_a_check_in_finish_promptly(bomb: bytes) -> None:
    validator = StreamValidator(storage("zstd"))
    validator.feed(bomb * 16)  # small: held, then inflated by finish() for seconds
    verdict: list[TarSummary | str] = []
    checker = threading.Thread(target=lambda: verdict.append(outcome(validator.finish)))
    checker.start()
    time.sleep(0.05)
    started = time.monotonic()
    validator.abort()
    checker.join(timeout=5)
    assert time.monotonic() - started < 0.5
    assert verdict == ["invalid: validation aborted"]


def test_finish_after_abort_of_a_held_body_is_a_rejection() -> None:
    validator = StreamValidator(storage())
    validator.feed(compress(build_tar()))
    validator.abort()
    validator.feed(b"more")  # dropped
    with pytest.raises(InvalidTarball, match="aborted"):
        validator.finish()


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data


def test_read_meta_commit_on_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ep-1.tar.zst"
    path.write_bytes(compress(build_tar()))
    with path.open("rb") as file:
        assert read_meta_commit(file, storage()) == COMMIT


def test_read_meta_commit_stops_at_meta_json() -> None:
    tail = entry("data/big.bin", data=os.urandom(8 * MiB))
    body = compress(build_tar(tail))
    file = CountingFile(body[: len(body) // 2])  # truncated after meta.json: never read
    assert read_meta_commit(file, storage()) == COMMIT
    assert file.consumed <= 2 * MiB


def test_read_meta_commit_none_without_usable_commit() -> None:
    assert read_meta_commit(io.BytesIO(compress(build_tar(meta=None))), storage()) is None
    assert read_meta_commit(io.BytesIO(compress(build_tar(meta=b"[]"))), storage()) is None


def test_read_meta_commit_finds_meta_json_in_the_top_level_directory() -> None:
    assert read_meta_commit(io.BytesIO(compress(episode_dir_tar("ep-1"))), storage()) == COMMIT
    two = episode_dir_tar("a", entry("b", tarfile.DIRTYPE), entry("b/meta.json", data=META))
    assert read_meta_commit(io.BytesIO(compress(two)), storage()) is None


def test_read_meta_commit_rejects_unreadable_file() -> None:
    with pytest.raises(InvalidTarball):
        read_meta_commit(io.BytesIO(b"not zstd at all"), storage())
