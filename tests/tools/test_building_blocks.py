"""The pieces under the two CLIs: progress bar, bounded parallel reads, raw index lines."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.storage import IndexAudit, StoredBlob, Stray, digest_stream, read_index_snapshot
from receiver.storage.filesystem import FilesystemStore
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.jsonl_audit import MAX_LINE
from receiver.storage.rows import encode_row, new_row
from tools import cli_common
from tools.listed_blobs import ListedBlobs
from tools.progress import Progress
from tools.scan import Cancelled, bounded_map
from tools.verify import Verifier


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_with_files_bytes_and_rate() -> None:
    terminal = FakeTerminal()
    progress = Progress("verify", 2, 4 * 1024 * 1024, terminal)
    progress.add_bytes(4 * 1024 * 1024)
    progress.file_done()
    progress.close()
    drawn = terminal.getvalue()
    assert "1/2 files" in drawn and "4.0 MiB/4.0 MiB" in drawn and "MB/s" in drawn
    assert drawn.startswith("\r") and drawn.endswith("\n")


def test_progress_draws_nothing_when_not_a_terminal() -> None:
    pipe = io.StringIO()
    progress = Progress("verify", 1, 10, pipe)
    progress.add_bytes(10)
    progress.file_done()
    progress.close()
    assert pipe.getvalue() == ""


def test_digest_stream_hands_every_block_to_on_block(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    blocks: list[bytes] = []
    with path.open("rb") as handle:
        digest = digest_stream(handle, blocks.append)
    assert digest == (hashlib.sha256(data).hexdigest(), len(data))
    assert b"".join(blocks) == data and len(blocks) == 3


def test_filesystem_store_may_name_its_episodes_dir(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path, episodes_dir=tmp_path / "restored")
    assert store.final_path("h", "e") == tmp_path / "restored" / "h" / "e.tar.zst"
    assert FilesystemStore(tmp_path).episodes_dir == tmp_path / "episodes"


def test_bounded_map_pulls_at_most_twice_the_workers_ahead_of_the_consumer() -> None:
    pulled = 0
    ahead: list[int] = []

    def items() -> Iterator[int]:
        nonlocal pulled
        for number in range(40):
            pulled += 1
            yield number

    results = {}
    for number, doubled in bounded_map(lambda n: n * 2, items(), 3, threading.Event()):
        results[number] = doubled
        ahead.append(pulled - len(results))
    assert results == {number: number * 2 for number in range(40)}
    assert max(ahead) <= 2 * 3


def test_bounded_map_ends_soon_after_stop_is_set_and_drops_queued_items() -> None:
    stop = threading.Event()
    started: list[int] = []

    def work(number: int) -> int:
        started.append(number)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if stop.is_set():
                raise Cancelled
            time.sleep(0.001)
        return number

    def consume() -> None:
        for _ in bounded_map(work, range(100), 2, stop):
            pass

    def fail_soon() -> None:
        time.sleep(0.05)
        stop.set()  # as a KeyboardInterrupt in the consumer does

    threading.Thread(target=fail_soon).start()
    begun = time.monotonic()
    with pytest.raises(Cancelled):
        consume()
    assert time.monotonic() - begun < 2
    assert len(started) <= 4


def test_index_snapshot_reports_an_overlong_line_without_keeping_it(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    row = encode_row(new_row("h", "e", "a" * 64, 1, None))
    index.write_bytes(row + b"x" * (MAX_LINE * 3) + b"\n" + row)
    snapshot = read_index_snapshot(index)
    assert [bad.line for bad in snapshot.bad_lines] == [2]
    assert "longer than" in snapshot.bad_lines[0].error
    assert [numbered.line for numbered in snapshot.rows] == [1, 3]
    assert snapshot.torn_tail is None and snapshot.size == index.stat().st_size


def test_index_audit_reports_as_the_snapshot_does(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    rows = [encode_row(new_row(f"h{n % 3}", f"e{n}", "a" * 64, n, None)) for n in range(50)]
    other = encode_row(new_row("h1", "e1", "b" * 64, 7, None))
    overlong = b"x" * (MAX_LINE * 2) + b"\n"
    index.write_bytes(b"".join(rows[:20]) + b"not json\n" + overlong + b"".join(rows[20:]) + other
                      + rows[4] + b'{"torn')  # fmt: skip
    snapshot = read_index_snapshot(index)
    with IndexAudit(index) as audit:
        assert audit.rows == len(snapshot.rows) == 52
        assert audit.bad_lines == snapshot.bad_lines and audit.torn_tail == snapshot.torn_tail
        grouped = snapshot.by_key()
        assert sorted(audit.duplicates(), key=lambda g: g[0].row.key) == sorted(
            (group for group in grouped.values() if len(group) > 1), key=lambda g: g[0].row.key
        )
        assert audit.lookup(("h1", "e1")) == grouped[("h1", "e1")][0]
        assert audit.lookup(("h9", "e1")) is None
        kept = {key for n, key in enumerate(grouped) if n % 2}
        assert list(audit.rows_not_in(kept)) == sorted(
            (group[0] for key, group in grouped.items() if key not in kept),
            key=lambda numbered: numbered.row.key,
        )
        with index.open("ab") as handle:  # the torn row completed, then one more
            handle.write(b"\n" + encode_row(new_row("h5", "late", "c" * 64, 1, None)))
        assert audit.lookup(("h5", "late")) is None
        audit.catch_up()
        late = audit.lookup(("h5", "late"))
        assert late is not None and late.line == 56 and late.row.sha256 == "c" * 64
    with IndexAudit(index, host="h1") as only_h1:
        duplicated = {group[0].row.key for group in only_h1.duplicates()}
        assert only_h1.rows == 19 and duplicated == {("h1", "e1"), ("h1", "e4")}
    with IndexAudit(tmp_path / "absent.jsonl") as empty:
        assert empty.rows == 0 and empty.duplicates() == [] and empty.lookup(("h", "e")) is None


def _write_index(index: Path, rows: int) -> Path:
    """rows rows over 100 hosts (row n: host h{n % 100}, episode e{n}, size n)."""
    with index.open("wb") as handle:
        for start in range(0, rows, 10_000):
            handle.write(
                b"".join(
                    encode_row(new_row(f"h{n % 100}", f"e{n}", "a" * 64, n, None))
                    for n in range(start, min(rows, start + 10_000))
                )
            )
    return index


def test_index_audit_memory_does_not_grow_with_the_rows(tmp_path: Path) -> None:
    index = _write_index(tmp_path / "index.jsonl", 100_000)
    tracemalloc.start()
    try:
        with IndexAudit(index) as audit:
            assert audit.rows == 100_000 and audit.lookup(("h7", "e99907")) is not None
            assert sum(1 for _ in audit.rows_not_in(set())) == 100_000
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The rows as objects (read_index_snapshot) take tens of MiB here; the audit a chunk.
    assert peak < 8 << 20, peak


def test_index_torn_tail_bytes_measures_without_cutting(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    index = JsonlCatalogue(path)
    assert index.torn_tail_bytes() == 0  # no index yet
    row = encode_row(new_row("h", "e", "a" * 64, 1, None))
    path.write_bytes(row)
    assert index.torn_tail_bytes() == 0
    path.write_bytes(row + b'{"half a')
    assert index.torn_tail_bytes() == 8
    assert path.read_bytes() == row + b'{"half a'


def _synthetic_listing(count: int) -> Iterator[StoredBlob | Stray]:
    """What a store of `count` blobs over 100 hosts lists, generated (no files): creating
    100,000 files would dominate the test's time; the store's own scan is tested apart."""
    yield Stray("/somewhere/odd", "not a host directory")
    for n in range(count):
        yield StoredBlob(f"h{n % 100}", f"e{n}", n, f"/episodes/h{n % 100}/e{n}.tar.zst")


class _SyntheticStore(FilesystemStore):
    def __init__(self, root: Path, count: int) -> None:
        super().__init__(root)
        self.count = count

    def scan_blobs(self, host_id: str | None = None) -> Iterator[StoredBlob | Stray]:
        return _synthetic_listing(self.count)


def test_listed_blobs_memory_does_not_grow_with_the_blobs(tmp_path: Path) -> None:
    store = _SyntheticStore(tmp_path, 100_000)
    tracemalloc.start()
    try:
        with ListedBlobs.of(store) as listed:
            assert (listed.listed, listed.count) == (100_000, 100_000)
            assert listed.bytes == sum(range(100_000))
            assert ("h7", "e99907") in listed and ("h7", "e99908") not in listed
            in_order, previous = 0, ("", "")
            for blob in listed:
                in_order += blob.key > previous
                previous = blob.key
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_order == 100_000  # every blob, in key order
    assert [stray.reason for stray in listed.strays] == ["not a host directory"]
    # The listing as StoredBlob objects and a set of keys take about 44 MiB here.
    assert peak < 8 << 20, peak


def test_listed_blobs_keeps_only_what_keep_keeps_and_counts_all(tmp_path: Path) -> None:
    store = _SyntheticStore(tmp_path, 1_000)
    with ListedBlobs.of(store, keep=lambda blob: blob.size_bytes % 10 == 0) as listed:
        assert (listed.listed, listed.count) == (1_000, 100)
        assert [blob.size_bytes for blob in listed] == sorted(
            range(0, 1_000, 10), key=lambda n: (f"h{n % 100}", f"e{n}")
        )
        assert all(blob.where == store.where(*blob.key) for blob in listed)


def test_verify_memory_does_not_grow_with_the_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify --quick over 100,000 rows and as many listed blobs: both passes on disk."""
    (tmp_path / "episodes").mkdir()
    _write_index(tmp_path / "index.jsonl", 100_000)
    monkeypatch.setattr(
        FilesystemStore, "scan_blobs", lambda self, host=None: _synthetic_listing(100_000)
    )
    location = cli_common.from_data_dir("episode-verify", tmp_path)
    tracemalloc.start()
    try:
        report = Verifier(location, quick=True, jobs=2).run(None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.rows, report.files) == (100_000, 100_000)
    assert report.missing == [] and report.orphaned == [] and report.size_mismatch == []
    assert len(report.stray) == 1
    assert peak < 12 << 20, peak  # the listing and key set as objects: about 44 MiB
