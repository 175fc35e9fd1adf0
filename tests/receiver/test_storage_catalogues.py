"""The Catalogue contract, the same tests for every backend: memory, jsonl, PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from receiver.config import PostgresIndexConfig
from receiver.storage import Catalogue, IndexRow, new_row
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.marks import KEEP_SECONDS, CommitSummary, Rejection, StaleRefusal
from receiver.storage.memory import MemoryCatalogue
from receiver.storage.postgresql import PostgresCatalogue

Factory = Callable[[], Catalogue]


@pytest.fixture(params=["memory", "jsonl", "postgresql"])
def open_catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens catalogues over one shared store: two of them are two processes' views."""
    opened: list[Catalogue] = []
    shared_memory = MemoryCatalogue()
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else ""

    def factory() -> Catalogue:
        catalogue: Catalogue
        if request.param == "memory":
            catalogue = shared_memory
        elif request.param == "jsonl":
            catalogue = JsonlCatalogue(tmp_path / "index.jsonl")
        else:
            catalogue = PostgresCatalogue(PostgresIndexConfig(dsn=dsn))
        catalogue.recover()
        catalogue.open()
        opened.append(catalogue)
        return catalogue

    yield factory
    for catalogue in opened:
        catalogue.close()


def row(episode: str, host: str = "lab-07", sha: str = "a" * 64, size: int = 10) -> IndexRow:
    return new_row(host, episode, sha, size, "c" * 40)


def test_append_if_absent_keeps_the_first_row_of_an_id(open_catalogue: Factory) -> None:
    catalogue = open_catalogue()
    first = row("ep-1")
    assert catalogue.append_if_absent(first) == (first, True)
    assert catalogue.append_if_absent(row("ep-1", sha="b" * 64)) == (first, False)
    assert catalogue.lookup("lab-07", "ep-1") == first
    assert catalogue.lookup("lab-07", "ep-2") is None
    assert catalogue.count() == 1


def test_rows_appended_by_another_writer_are_seen(open_catalogue: Factory) -> None:
    mine, theirs = open_catalogue(), open_catalogue()
    theirs.append_if_absent(row("ep-9"))
    assert mine.lookup("lab-07", "ep-9") is not None
    assert mine.append_if_absent(row("ep-9", sha="b" * 64))[1] is False
    assert mine.count() == 1


def test_racing_writers_leave_exactly_one_row_per_id(open_catalogue: Factory) -> None:
    writers = [open_catalogue() for _ in range(4)]
    won: list[bool] = []
    barrier = threading.Barrier(len(writers))

    def race(catalogue: Catalogue, sha: str) -> None:
        barrier.wait()
        for number in range(20):
            won.append(catalogue.append_if_absent(row(f"ep-{number}", sha=sha))[1])

    threads = [threading.Thread(target=race, args=(w, str(i) * 64)) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 20 and writers[0].count() == 20


def test_a_claim_holds_the_id_until_released(open_catalogue: Factory) -> None:
    mine, theirs = open_catalogue(), open_catalogue()
    assert mine.claim("lab-07", "ep-1")
    assert not mine.claim("lab-07", "ep-1")  # twice in one process: still refused
    if isinstance(mine, PostgresCatalogue):
        # Another session is another receiver. (jsonl claims are POSIX locks, which belong
        # to the process: across processes they are tested in test_locks.py.)
        assert not theirs.claim("lab-07", "ep-1")
    assert mine.claim("lab-07", "ep-2")
    mine.release("lab-07", "ep-1")
    assert theirs.claim("lab-07", "ep-1")


def test_rows_after_is_commit_order_and_resumes_after_a_key(open_catalogue: Factory) -> None:
    catalogue = open_catalogue()
    rows = [row(f"ep-{n}", host=f"h{n % 3}") for n in range(7)]
    for each in rows:
        catalogue.append_if_absent(each)
    assert list(catalogue.rows_after(None)) == rows
    assert list(catalogue.rows_after(rows[3].key)) == rows[4:]
    assert list(catalogue.rows_after(rows[-1].key)) == []
    with pytest.raises(KeyError):
        list(catalogue.rows_after(("nobody", "nothing")))
    assert sorted(r.key for r in catalogue.iter_rows()) == sorted(r.key for r in rows)


def test_host_summaries_count_episodes_bytes_and_the_newest_row(open_catalogue: Factory) -> None:
    catalogue = open_catalogue()
    for number in range(3):
        catalogue.append_if_absent(new_row("h1", f"e{number}", "a" * 64, 100, f"{number}" * 40))
    catalogue.append_if_absent(new_row("h2", "e0", "a" * 64, 5, None))
    summaries = catalogue.host_summaries()
    assert (summaries["h1"].episodes, summaries["h1"].bytes) == (3, 300)
    assert summaries["h1"].last_commit == "2" * 40
    assert (summaries["h2"].episodes, summaries["h2"].last_commit) == (1, None)


def test_postgresql_export_order_never_passes_a_row_that_commits_later(
    postgres_dsn: str,
) -> None:
    """seq is handed out at insert: a slow transaction's row must not be skipped by export."""
    import psycopg

    catalogue = PostgresCatalogue(PostgresIndexConfig(dsn=postgres_dsn))
    catalogue.recover()
    try:
        catalogue.append_if_absent(row("ep-0"))
        with psycopg.connect(postgres_dsn) as slow:  # a transaction, left open for now
            slow.execute(
                "INSERT INTO episodes (host_id, episode_id, sha256, size_bytes, "
                "received_at_wall) VALUES ('lab-07', 'ep-slow', %s, 1, 'x')",
                ("a" * 64,),
            )
            catalogue.append_if_absent(row("ep-fast"))  # commits first, with a later seq
            exported = [r.episode_id for r in catalogue.rows_after(None)]
            assert exported == ["ep-0"]  # ep-fast waits behind the open transaction
            slow.commit()
        assert [r.episode_id for r in catalogue.rows_after(None)] == ["ep-0", "ep-slow", "ep-fast"]
        assert [r.episode_id for r in catalogue.rows_after(("lab-07", "ep-0"))] == [
            "ep-slow",
            "ep-fast",
        ]
    finally:
        catalogue.close()


def test_rejections_and_stale_marks_are_shared_and_bounded_in_time(
    open_catalogue: Factory,
) -> None:
    mine, theirs = open_catalogue(), open_catalogue()
    now = time.time()
    old = Rejection(now - 2 * KEEP_SECONDS, "PUT", "lab-1", "ep-0", "stale-commit", 412, None, 9)
    mine.record_rejection(old)
    newer = Rejection(now, "PUT", "lab-1", "ep-1", "unknown-commit", 412, "c" * 40, None)
    mine.record_rejection(newer)
    assert theirs.recent_rejections(now - KEEP_SECONDS) == [newer]  # the old one is gone
    refusal = StaleRefusal("lab-1", now, "c" * 40, "stale-commit", 7, "ep-1")
    mine.record_stale(refusal)
    mine.record_stale(StaleRefusal("lab-1", now + 1, "d" * 40, "stale-commit", 8, "ep-2"))
    theirs.record_accepted("lab-1", now + 2)
    theirs.record_accepted("lab-2", now + 2)  # no mark: nothing to note
    marks = mine.stale_marks(now - KEEP_SECONDS)
    assert list(marks) == ["lab-1"]
    assert (marks["lab-1"].refusals, marks["lab-1"].commit) == (2, "d" * 40)
    assert marks["lab-1"].accepted_since == now + 2


def test_commit_summaries_sum_episodes_and_bytes_per_commit(open_catalogue: Factory) -> None:
    catalogue = open_catalogue()
    for number, commit in enumerate(["a" * 40, "a" * 40, None]):
        catalogue.append_if_absent(new_row("h", f"e{number}", "0" * 64, 10 + number, commit))
    summaries = catalogue.commit_summaries()
    assert summaries["a" * 40] == CommitSummary(2, 21)
    assert summaries[None] == CommitSummary(1, 12)
