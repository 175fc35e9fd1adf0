"""The jsonl catalogue: row format, append-once, catching up, torn tails, corruption, durability."""

from __future__ import annotations

import datetime as dt
import errno
import gc
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from receiver.config import FilesystemStorageConfig, GateConfig, ReceiverConfig
from receiver.storage import CatalogueCorrupt, DurabilityError, open_storage
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.rows import IndexRow, decode_row, encode_row, new_row

SHA_A = "a" * 64
SHA_B = "b" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BASE_KEYS = {"episode_id", "host_id", "received_at_wall", "schema_version", "sha256", "size_bytes"}

SHARED_KEYS = 50
OWN_KEYS = 10
WORKERS = 4


def row(episode_id: str, host_id: str = "lab-07", sha256: str = SHA_A) -> IndexRow:
    return new_row(host_id, episode_id, sha256, 123, COMMIT)


def index_file(tmp_path: Path) -> Path:
    return tmp_path / "index.jsonl"


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def torn_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.torn-*"))


# -- row format -------------------------------------------------------------------


def test_row_is_one_line_with_sorted_keys_and_schema_version_1() -> None:
    line = encode_row(row("ep-0001"))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    decoded = json.loads(line)
    assert list(decoded) == sorted(decoded)
    assert set(decoded) == BASE_KEYS | {"commit"}
    assert decoded["schema_version"] == 1
    assert decoded["commit"] == COMMIT
    assert decoded["sha256"] == SHA_A
    assert decoded["size_bytes"] == 123


def test_row_without_commit_omits_the_commit_key() -> None:
    decoded = json.loads(encode_row(new_row("lab-07", "ep-1", SHA_A, 5, None)))
    assert set(decoded) == BASE_KEYS
    assert decoded["schema_version"] == 1


def test_backfilled_key_is_written_only_when_true() -> None:
    plain = json.loads(encode_row(new_row("lab-07", "ep-1", SHA_A, 5, COMMIT, backfilled=False)))
    backfilled = json.loads(
        encode_row(new_row("lab-07", "ep-1", SHA_A, 5, COMMIT, backfilled=True))
    )
    assert "backfilled" not in plain
    assert backfilled["backfilled"] is True
    assert set(backfilled) == BASE_KEYS | {"commit", "backfilled"}
    assert list(backfilled) == sorted(backfilled)
    assert backfilled["schema_version"] == 1


def test_received_at_wall_is_utc_iso_with_microseconds() -> None:
    stamp = json.loads(encode_row(row("ep-1")))["received_at_wall"]
    parsed = dt.datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == dt.timedelta(0)
    assert stamp.endswith("+00:00")
    assert len(stamp) == len("2026-11-22T10:00:00.123456+00:00")


def test_decode_row_round_trips_encode_row() -> None:
    for original in (
        row("ep-1"),
        new_row("lab-07", "ep-2", SHA_B, 0, None),
        new_row("lab-07", "ep-3", SHA_B, 9, COMMIT, backfilled=True),
    ):
        assert decode_row(encode_row(original)) == original


def test_rows_appended_to_the_file_have_sorted_contract_keys(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-1"))
    index.append_if_absent(new_row("lab-07", "ep-2", SHA_B, 7, None, backfilled=True))
    first, second = (json.loads(line) for line in lines_of(path))
    assert list(first) == sorted(first) and set(first) == BASE_KEYS | {"commit"}
    assert list(second) == sorted(second) and set(second) == BASE_KEYS | {"backfilled"}


# -- append once --------------------------------------------------------------------


def test_append_if_absent_appends_once_and_returns_the_existing_row(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    first = row("ep-1", sha256=SHA_A)
    stored, appended = index.append_if_absent(first)
    assert (stored, appended) == (first, True)
    again, appended_again = index.append_if_absent(row("ep-1", sha256=SHA_B))
    assert appended_again is False
    assert again == first
    assert len(lines_of(path)) == 1
    assert index.lookup("lab-07", "ep-1") == first
    assert len(index) == 1


def test_append_decides_by_the_file_when_the_view_points_at_a_wrong_line(
    tmp_path: Path,
) -> None:
    """A line past the first 4 KiB rewritten in place (same length, the last line kept):
    the view's start-up checks cannot see it, so the writer checks the line it reads."""
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    for number in range(60):
        index.append_if_absent(row(f"ep-{number:02d}"))
    data = path.read_bytes()
    edited = data.index(b'"ep-30"')
    assert edited > 4096
    path.write_bytes(data[:edited] + b'"ep-XX"' + data[edited + 7 :])  # same inode
    stored, appended = index.append_if_absent(row("ep-30", sha256=SHA_B))
    # The file no longer holds ep-30: the row is appended (not answered with ep-XX's).
    assert appended is True and stored.sha256 == SHA_B
    assert index.lookup("lab-07", "ep-30") == stored
    assert [json.loads(line)["episode_id"] for line in lines_of(path)].count("ep-30") == 1


def test_same_episode_id_on_another_host_is_a_different_row(tmp_path: Path) -> None:
    index = JsonlCatalogue(index_file(tmp_path))
    assert index.append_if_absent(row("ep-1", host_id="lab-01"))[1] is True
    assert index.append_if_absent(row("ep-1", host_id="lab-02"))[1] is True
    assert len(index) == 2


def test_load_reads_back_what_was_appended(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    writer = JsonlCatalogue(path)
    written = [row(f"ep-{i}") for i in range(5)]
    for each in written:
        writer.append_if_absent(each)
    reader = JsonlCatalogue(path)
    reader.load()
    assert sorted(reader.rows(), key=lambda r: r.episode_id) == written


def test_load_of_a_missing_file_is_an_empty_index(tmp_path: Path) -> None:
    index = JsonlCatalogue(index_file(tmp_path))
    index.load()
    index.refresh()
    assert len(index) == 0


# -- several writers ----------------------------------------------------------------


def test_two_instances_see_each_others_rows_via_refresh(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    a, b = JsonlCatalogue(path), JsonlCatalogue(path)
    a.load()
    b.load()
    a.append_if_absent(row("ep-a"))
    b.append_if_absent(row("ep-b"))
    a.refresh()
    b.refresh()
    assert a.lookup("lab-07", "ep-b") is not None
    assert b.lookup("lab-07", "ep-a") is not None
    assert len(a) == len(b) == 2


def test_two_instances_never_duplicate_a_key(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    a, b = JsonlCatalogue(path), JsonlCatalogue(path)
    a.load()
    b.load()  # b's view is now stale: it has not seen a's append
    first = row("ep-1", sha256=SHA_A)
    a.append_if_absent(first)
    stored, appended = b.append_if_absent(row("ep-1", sha256=SHA_B))
    assert appended is False
    assert stored == first
    assert len(lines_of(path)) == 1


def _append_worker(path: str, worker: int, barrier: Barrier) -> None:
    """In a spawned process: race the other workers on the shared keys, add our own."""
    barrier.wait(timeout=30)
    index = JsonlCatalogue(Path(path))
    for i in range(SHARED_KEYS):
        index.append_if_absent(new_row("shared", f"ep-{i}", SHA_A, i, None))
        if i % (SHARED_KEYS // OWN_KEYS) == 0:
            own = i // (SHARED_KEYS // OWN_KEYS)
            index.append_if_absent(new_row(f"host-{worker}", f"ep-{own}", SHA_B, own, COMMIT))


def test_processes_racing_on_the_same_keys_write_one_line_per_key(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    processes = [
        context.Process(target=_append_worker, args=(str(path), worker, barrier))
        for worker in range(WORKERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * WORKERS

    rows = [decode_row(line) for line in lines_of(path)]  # every line parses
    keys = [each.key for each in rows]
    expected = {("shared", f"ep-{i}") for i in range(SHARED_KEYS)} | {
        (f"host-{w}", f"ep-{i}") for w in range(WORKERS) for i in range(OWN_KEYS)
    }
    assert len(keys) == len(set(keys))
    assert set(keys) == expected
    assert path.read_bytes().endswith(b"\n")


# -- torn tail ----------------------------------------------------------------------

TORN = b'{"commit":"0123","episode_id":"ep-torn","ho'


def write_with_torn_tail(path: Path, count: int = 2) -> bytes:
    good = b"".join(encode_row(row(f"ep-{i}")) for i in range(count))
    path.write_bytes(good + TORN)
    return good


def test_load_ignores_a_torn_tail(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    write_with_torn_tail(path)
    index = JsonlCatalogue(path)
    index.load(strict=True)
    assert len(index) == 2
    assert index.lookup("lab-07", "ep-torn") is None


def test_load_ignores_a_tail_that_is_a_whole_row_without_its_newline(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    path.write_bytes(encode_row(row("ep-0")) + encode_row(row("ep-1")).rstrip(b"\n"))
    index = JsonlCatalogue(path)
    index.load()
    assert len(index) == 1
    assert index.lookup("lab-07", "ep-1") is None


def test_refresh_ignores_a_torn_tail_and_reads_the_line_once_completed(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    completed = row("ep-1")
    line = encode_row(completed)
    with path.open("ab") as handle:
        handle.write(line[:20])
    index.refresh()
    assert len(index) == 1
    with path.open("ab") as handle:
        handle.write(line[20:])
    index.refresh()
    assert index.lookup("lab-07", "ep-1") == completed
    assert len(index) == 2


def test_repair_torn_tail_cuts_it_off_and_keeps_a_copy(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    good = write_with_torn_tail(path)
    index = JsonlCatalogue(path)
    with index.locked():
        cut = index.repair_torn_tail()
    assert cut == len(TORN)
    assert path.read_bytes() == good
    [side] = torn_files(path)
    assert side.read_bytes() == TORN


def test_repair_torn_tail_of_a_clean_file_changes_nothing(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    good = b"".join(encode_row(row(f"ep-{i}")) for i in range(3))
    path.write_bytes(good)
    index = JsonlCatalogue(path)
    with index.locked():
        assert index.repair_torn_tail() == 0
    assert path.read_bytes() == good
    assert torn_files(path) == []


def test_repair_torn_tail_of_a_file_without_any_newline_empties_it(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    path.write_bytes(TORN)
    index = JsonlCatalogue(path)
    with index.locked():
        assert index.repair_torn_tail() == len(TORN)
    assert path.read_bytes() == b""
    [side] = torn_files(path)
    assert side.read_bytes() == TORN


def test_append_if_absent_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    good = write_with_torn_tail(path)
    index = JsonlCatalogue(path)
    index.load()
    new = row("ep-new")
    assert index.append_if_absent(new) == (new, True)
    assert path.read_bytes() == good + encode_row(new)
    [side] = torn_files(path)
    assert side.read_bytes() == TORN
    assert all(decode_row(line) for line in lines_of(path))


def test_append_if_absent_cuts_a_torn_tail_written_after_load(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    good = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(TORN)
    new = row("ep-new")
    index.append_if_absent(new)
    assert path.read_bytes() == good + encode_row(new)
    [side] = torn_files(path)
    assert side.read_bytes() == TORN


# -- corruption ---------------------------------------------------------------------


def write_with_corrupt_line(path: Path) -> None:
    lines = [encode_row(row(f"ep-{i}")) for i in range(4)]
    lines[2] = b'{"this is": "not a row"}\n'
    path.write_bytes(b"".join(lines))


def test_strict_load_of_a_corrupt_middle_line_names_the_line_number(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    write_with_corrupt_line(path)
    with pytest.raises(CatalogueCorrupt, match=r"line 3\b"):
        JsonlCatalogue(path).load(strict=True)


def test_strict_load_names_the_line_of_garbage_that_is_not_json(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    path.write_bytes(encode_row(row("ep-0")) + b"\x00\xffgarbage\n" + encode_row(row("ep-2")))
    with pytest.raises(CatalogueCorrupt, match=r"line 2\b"):
        JsonlCatalogue(path).load()


def test_non_strict_load_skips_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    write_with_corrupt_line(path)
    index = JsonlCatalogue(path)
    index.load(strict=False)
    assert sorted(r.episode_id for r in index.rows()) == ["ep-0", "ep-1", "ep-3"]


# -- failed append ------------------------------------------------------------------


def half_write_then_enospc(real_write: Callable[[int, bytes], int], line: bytes) -> object:
    def fake_write(fd: int, data: bytes) -> int:
        if bytes(data) != line:
            return real_write(fd, data)
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return fake_write


def test_failed_append_raises_durability_error_and_leaves_the_file_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    before = path.read_bytes()
    new = row("ep-1")
    monkeypatch.setattr(
        "receiver.storage.jsonl.os.write", half_write_then_enospc(os.write, encode_row(new))
    )
    with pytest.raises(DurabilityError):
        index.append_if_absent(new)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert index.lookup("lab-07", "ep-1") is None


def test_append_after_a_failed_append_writes_a_clean_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    before = path.read_bytes()
    new = row("ep-1")
    monkeypatch.setattr(
        "receiver.storage.jsonl.os.write", half_write_then_enospc(os.write, encode_row(new))
    )
    with pytest.raises(DurabilityError):
        index.append_if_absent(new)
    monkeypatch.undo()
    assert index.append_if_absent(new) == (new, True)
    assert path.read_bytes() == before + encode_row(new)
    assert torn_files(path) == []


def test_failed_first_append_leaves_no_partial_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    new = row("ep-0")
    monkeypatch.setattr(
        "receiver.storage.jsonl.os.write", half_write_then_enospc(os.write, encode_row(new))
    )
    with pytest.raises(DurabilityError):
        index.append_if_absent(new)
    monkeypatch.undo()
    assert not path.exists() or path.read_bytes() == b""
    assert len(index) == 0


# -- replacement --------------------------------------------------------------------


def test_refresh_detects_a_replaced_file_of_the_same_size(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    index.append_if_absent(row("ep-1"))
    old_size = path.stat().st_size
    # Same length, different rows, new inode (as a restore from backup would do).
    replacement = encode_row(row("ep-8")) + encode_row(row("ep-9"))
    assert len(replacement) == old_size
    staged = tmp_path / "index.jsonl.new"
    staged.write_bytes(replacement)
    os.replace(staged, path)
    index.refresh()
    assert sorted(r.episode_id for r in index.rows()) == ["ep-8", "ep-9"]


def test_refresh_after_replacement_by_a_longer_file_drops_old_rows(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    staged = tmp_path / "index.jsonl.new"
    staged.write_bytes(b"".join(encode_row(row(f"ep-{i}")) for i in range(5, 8)))
    os.replace(staged, path)
    index.refresh()
    assert sorted(r.episode_id for r in index.rows()) == ["ep-5", "ep-6", "ep-7"]
    assert index.append_if_absent(row("ep-0"))[1] is True
    assert len(lines_of(path)) == 4


# -- loading many rows at once --------------------------------------------------------


def test_load_of_many_rows_keeps_the_first_row_of_a_key(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    first, later = row("ep-1", sha256=SHA_A), row("ep-1", sha256=SHA_B)
    rows = [row(f"ep-{n}") for n in range(2, 50)]
    path.write_bytes(b"".join(encode_row(r) for r in [first, *rows, later]))
    index = JsonlCatalogue(path)
    index.load(strict=True)
    assert len(index) == 49
    assert index.lookup("lab-07", "ep-1") == first


@pytest.mark.parametrize(
    ("middle", "line"),
    [
        (b"\n", 2),  # a blank line
        (b"   \n", 2),  # whitespace only
        (encode_row(row("ep-a")).rstrip(b"\n") + b" " + encode_row(row("ep-b")), 2),  # two rows
    ],
)
def test_strict_load_names_a_line_that_is_not_exactly_one_row(
    tmp_path: Path, middle: bytes, line: int
) -> None:
    path = index_file(tmp_path)
    path.write_bytes(encode_row(row("ep-0")) + middle + encode_row(row("ep-9")))
    with pytest.raises(CatalogueCorrupt, match=rf"line {line}\b"):
        JsonlCatalogue(path).load(strict=True)


def test_a_catalogue_opened_after_recovery_sees_rows_appended_since(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    config = ReceiverConfig(
        storage=FilesystemStorageConfig(data_dir=path.parent),
        version_gate=GateConfig(enabled=False),
    )
    recovered = open_storage(config)
    recovered.catalogue.append_if_absent(row("ep-1"))
    recovered.catalogue.recover()
    recovered.close()
    JsonlCatalogue(path).append_if_absent(row("ep-2"))  # another writer, after recovery
    fresh = open_storage(config)
    fresh.catalogue.open()
    assert fresh.catalogue.count() == 2
    assert sorted(r.episode_id for r in fresh.catalogue.iter_rows()) == ["ep-1", "ep-2"]


# -- group commit -------------------------------------------------------------------


def test_rows_appended_by_many_threads_at_once_are_each_written_once(tmp_path: Path) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    rows = [row(f"ep-{n}") for n in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(index.append_if_absent, rows + rows))  # every key twice
    assert sorted(appended for _, appended in results) == [False] * 40 + [True] * 40
    assert all(stored == rows[n % 40] for n, (stored, _) in enumerate(results))
    assert sorted(lines_of(path)) == sorted(encode_row(r) for r in rows)
    reloaded = JsonlCatalogue(path)
    reloaded.load(strict=True)
    assert len(reloaded) == 40


def queue_while_locked(index: JsonlCatalogue, rows: list[IndexRow]) -> list[object]:
    """Append rows from one thread each while another append holds the lock; returns what
    each call returned or raised, once the lock was released and all of them finished."""
    outcomes: list[object] = [None] * len(rows)

    def append(number: int) -> None:
        try:
            outcomes[number] = index.append_if_absent(rows[number])
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcomes[number] = error

    threads = [threading.Thread(target=append, args=(n,)) for n in range(len(rows))]
    with index._mutex:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(index._queue) < len(rows) and time.monotonic() < deadline:
            time.sleep(0.001)
    for thread in threads:
        thread.join(10)
    return outcomes


def test_appends_queued_meanwhile_share_one_write_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    writes: list[int] = []
    fsyncs: list[int] = []
    real_write, real_fsync = os.write, os.fsync

    def counted_write(fd: int, data: bytes) -> int:
        writes.append(fd)
        return real_write(fd, data)

    def counted_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("receiver.storage.jsonl.os.write", counted_write)
    monkeypatch.setattr("receiver.storage.jsonl.os.fsync", counted_fsync)
    rows = [row(f"ep-{n}") for n in range(1, 6)]
    outcomes = queue_while_locked(index, rows)
    monkeypatch.undo()
    assert outcomes == [(r, True) for r in rows]
    assert (len(writes), len(fsyncs)) == (1, 1)
    assert lines_of(path)[1:] == [encode_row(r) for r in rows]


def test_a_failed_group_write_fails_every_caller_and_leaves_the_file_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = index_file(tmp_path)
    index = JsonlCatalogue(path)
    index.append_if_absent(row("ep-0"))
    before = path.read_bytes()

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("receiver.storage.jsonl.os.write", no_space)
    rows = [row(f"ep-{n}") for n in range(1, 4)]
    outcomes = queue_while_locked(index, rows)
    monkeypatch.undo()
    assert all(isinstance(outcome, DurabilityError) for outcome in outcomes)
    assert path.read_bytes() == before
    assert all(index.lookup("lab-07", r.episode_id) is None for r in rows)


def test_rows_of_a_loaded_index_are_not_tracked_by_the_cyclic_collector(tmp_path: Path) -> None:
    # A million rows must not be walked by every full collection (pauses on the loop).
    path = tmp_path / "index.jsonl"
    rows = [new_row("h", f"e{n}", "a" * 64, n, None) for n in range(3)]
    path.write_bytes(b"".join(encode_row(row) for row in rows))
    index = JsonlCatalogue(path)
    index.load()
    loaded = list(index.rows())
    assert len(loaded) == 3
    assert not any(gc.is_tracked(row) for row in loaded)
    assert not gc.is_tracked(new_row("h", "fresh", "b" * 64, 1, None))
