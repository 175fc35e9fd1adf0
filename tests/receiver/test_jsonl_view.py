"""The jsonl view's schema: host numbers in the rows key, and views of an older schema.

Lookups, counts, totals and file-order iteration are checked against a model computed from
index.jsonl itself (the first row of each key wins), after appends through the catalogue,
after rows appended behind its back (catch-up) and after a rebuild.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.storage import jsonl_file, jsonl_sync
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.jsonl_view import SCHEMA_VERSION, view_path_for
from receiver.storage.marks import CommitSummary, Rejection, StaleRefusal
from receiver.storage.rows import HostSummary, IndexRow, decode_row, encode_row, new_row

# The rows table as schema 1 had it, keyed by the host's text.
SCHEMA_1_ROWS = """
CREATE TABLE rows (
    host_id TEXT NOT NULL, episode_id TEXT NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, PRIMARY KEY (host_id, episode_id)) WITHOUT ROWID
"""


def some_row(host: str, episode: str, size: int = 100, commit: str | None = None) -> IndexRow:
    return new_row(host, episode, "a" * 64, size, commit)


def model_of(path: Path) -> dict[tuple[str, str], IndexRow]:
    """The rows in force: the first line of each key, in file order."""
    rows: dict[tuple[str, str], IndexRow] = {}
    if path.exists():
        for line in path.read_bytes().splitlines(keepends=True):
            row = decode_row(line)
            rows.setdefault(row.key, row)
    return rows


def check_against_model(catalogue: JsonlCatalogue, path: Path, absent: list[str]) -> None:
    model = model_of(path)
    assert catalogue.count() == len(model)
    for key, row in model.items():
        assert catalogue.lookup(*key) == row
    for host in absent:
        assert catalogue.lookup(host, "never-stored") is None
    assert list(catalogue.iter_rows()) == list(model.values())
    hosts: dict[str, HostSummary] = {}
    commits: dict[str | None, CommitSummary] = {}
    for row in model.values():
        summary = hosts.setdefault(row.host_id, HostSummary())
        summary.episodes += 1
        summary.bytes += row.size_bytes
        if row.received_at_wall >= summary.last_seen:
            summary.last_seen, summary.last_commit = row.received_at_wall, row.commit
        before = commits.get(row.commit, CommitSummary(0, 0))
        commits[row.commit] = CommitSummary(before.episodes + 1, before.bytes + row.size_bytes)
    assert catalogue.host_summaries() == hosts
    assert catalogue.commit_summaries() == commits


OPS = st.lists(
    st.tuples(
        st.sampled_from(["append", "behind", "duplicate"]),
        st.sampled_from(["h0", "h1", "h2", "h3"]),
        st.sampled_from(["e0", "e1", "e2"]),
        st.integers(min_value=1, max_value=5),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_lookups_totals_and_order_match_the_file_after_catch_up_and_rebuild(
    ops: list[tuple[str, str, str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.jsonl"
        catalogue, other = JsonlCatalogue(path), JsonlCatalogue(path)
        catalogue.load()
        for op, host, episode, size in ops:
            if op == "append":  # through the view, which numbers new hosts as it goes
                catalogue.append_if_absent(some_row(host, episode, size, commit=f"c{size}"))
            elif op == "behind":  # another process: caught up by the next refresh
                other.append_if_absent(some_row(host, episode, size))
            else:  # a second line for a key (as a crashed writer could leave): the first wins
                with path.open("ab") as handle:
                    handle.write(encode_row(some_row(host, episode, size)))
        check_against_model(catalogue, path, ["h0", "h9"])
        catalogue.close()
        other.close()
        view_path_for(path).unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{view_path_for(path)}{suffix}").unlink(missing_ok=True)
        rebuilt = JsonlCatalogue(path)
        check_against_model(rebuilt, path, ["h0", "h9"])
        rebuilt.close()


@pytest.mark.parametrize("big", [False, True])
def test_a_build_keeps_the_first_row_of_a_key_within_a_chunk_and_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big: bool
) -> None:
    if big:  # the big-build path: relaxed pragmas, several small chunks per transaction
        monkeypatch.setattr(jsonl_sync, "BIG_CATCH_UP", 0)
        monkeypatch.setattr(jsonl_sync, "BIG_BATCHES", 3)
        monkeypatch.setattr(jsonl_file, "CHUNK_BYTES", 1024)
    path = tmp_path / "index.jsonl"
    keys = [(f"h{n % 3}", f"e{n % 7}") for n in range(60)]  # every key several times
    rows = [some_row(host, episode, size) for size, (host, episode) in enumerate(keys, 1)]
    path.write_bytes(b"".join(map(encode_row, rows)))
    catalogue = JsonlCatalogue(path)
    catalogue.load()
    check_against_model(catalogue, path, ["h0", "h5"])
    assert catalogue.count() == 21
    catalogue.close()


def test_a_host_numbered_in_a_rolled_back_transaction_is_numbered_again(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    catalogue, other = JsonlCatalogue(path), JsonlCatalogue(path)
    catalogue.load()
    view = catalogue.view
    with pytest.raises(RuntimeError), view.lock, view.write() as conn:
        view._host_numbers(conn, ["lab-late"])  # numbered, then rolled back
        raise RuntimeError("the view update failed")
    # Meanwhile another process numbers another host: it may get the same number.
    other.append_if_absent(some_row("lab-first", "e1"))
    catalogue.append_if_absent(some_row("lab-late", "e1"))
    conn = sqlite3.connect(view.path)
    numbers = dict(conn.execute("SELECT host_id, number FROM host_keys").fetchall())
    conn.close()
    assert sorted(numbers) == ["lab-first", "lab-late"]
    assert len(set(numbers.values())) == 2
    check_against_model(catalogue, path, ["lab-first", "lab-late"])
    catalogue.close()
    other.close()


def schema_1_view(path: Path, rows: list[IndexRow]) -> None:
    """A view as the previous release left it: schema 1, one wrong row, a rejection, a mark."""
    catalogue = JsonlCatalogue(path)
    catalogue.record_rejection(Rejection(1e9, "PUT", "lab-old", "e9", "conflict", 409, None, None))
    catalogue.record_stale(StaleRefusal("lab-old", 1e9, None, "unknown-commit", None, "e9"))
    catalogue.close()
    conn = sqlite3.connect(view_path_for(path), isolation_level=None)
    conn.execute("DROP TABLE rows")
    conn.execute("DROP TABLE host_keys")
    conn.execute(SCHEMA_1_ROWS)
    conn.execute("INSERT INTO rows VALUES ('lab-a', 'e1', 5, 7)")  # not what the file holds
    conn.execute("INSERT INTO hosts VALUES ('lab-gone', 9, 9, '', NULL)")
    offset = len(b"".join(encode_row(row) for row in rows))
    conn.execute("UPDATE position SET offset = ?, lines = 1, rows = 1", (offset,))
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_a_view_of_schema_1_is_rebuilt_and_keeps_its_rejections_and_marks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "index.jsonl"
    rows = [some_row("lab-a", "e1"), some_row("lab-b", "e2", 300)]
    path.write_bytes(b"".join(encode_row(row) for row in rows))
    schema_1_view(path, rows)

    catalogue = JsonlCatalogue(path)
    catalogue.open()
    assert "has schema 1, not 2; rebuilding it" in caplog.text
    check_against_model(catalogue, path, ["lab-a"])
    assert [r.episode for r in catalogue.recent_rejections(0)] == ["e9"]
    assert list(catalogue.stale_marks(0)) == ["lab-old"]
    catalogue.close()
    conn = sqlite3.connect(view_path_for(path))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def test_a_view_of_a_newer_schema_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(encode_row(some_row("lab-a", "e1")))
    JsonlCatalogue(path).close()
    conn = sqlite3.connect(view_path_for(path), isolation_level=None)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    catalogue = JsonlCatalogue(path)
    check_against_model(catalogue, path, ["lab-a"])
    catalogue.close()
