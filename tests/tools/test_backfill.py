"""episode-backfill on stores a real receiver wrote: lost rows, hand-placed and broken tarballs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import PROJECT_ROOT, make_tarball, receiver_config, write_toml
from tests.tools.conftest import Store, Tool, store_args


def test_backfill_restores_deleted_rows_with_backfilled_flag(store: Store, backfill: Tool) -> None:
    lost = ("lab-01", "ep-0001")
    store.drop_rows(lost)
    result = backfill(*store_args(store))
    assert result.code == 0, result.err
    rows = {(row["host_id"], row["episode_id"]): row for row in store.rows()}
    assert len(rows) == len(store.bodies) == len(store.rows())
    restored = rows[lost]
    assert restored["backfilled"] is True
    assert restored["commit"] == store.commit
    assert restored["sha256"] == hashlib.sha256(store.bodies[lost]).hexdigest()
    assert restored["size_bytes"] == len(store.bodies[lost])
    assert "added lab-01/ep-0001" in result.out


def test_backfill_adds_hand_placed_tarball_with_commit_from_meta(
    store: Store, backfill: Tool
) -> None:
    other_commit = "ABCDEF0123456789abcdef0123456789abcdef01"  # meta.json's, any case
    body = make_tarball(other_commit)
    store.place("lab-09", "restored", body)
    result = backfill(*store_args(store))
    assert result.code == 0, result.err
    row = store.rows()[-1]
    assert (row["host_id"], row["episode_id"]) == ("lab-09", "restored")
    assert row["commit"] == other_commit.lower()
    assert row["backfilled"] is True
    assert row["sha256"] == hashlib.sha256(body).hexdigest()


def test_backfill_writes_a_row_without_commit_for_a_tarball_without_meta(
    store: Store, backfill: Tool
) -> None:
    store.place("lab-09", "no-meta", make_tarball(None))
    assert backfill(*store_args(store)).code == 0
    assert "commit" not in store.rows()[-1]


def _record_files(data_dir: Path) -> dict[Path, bytes]:
    """Every file but the index's view and the lock taken to refresh it: a dry run may bring
    that cache up to date (it is rebuilt from index.jsonl whenever in doubt)."""
    return {
        path: path.read_bytes()
        for path in data_dir.rglob("*")
        if path.is_file() and ".view.sqlite3" not in path.name and path.name != "index.jsonl.lock"
    }


def test_backfill_dry_run_writes_nothing(store: Store, backfill: Tool) -> None:
    store.drop_rows(("lab-02", "ep-0000"))
    store.place("lab-09", "by-hand", make_tarball(store.commit))
    with store.index.open("ab") as handle:
        handle.write(b'{"torn')
    (store.data_dir / "index.jsonl.lock").unlink()
    (store.data_dir / "episodes.lock").unlink()
    before = _record_files(store.data_dir)
    result = backfill(*store_args(store), "--dry-run")
    after = _record_files(store.data_dir)
    assert result.code == 0
    assert after == before
    assert not (store.data_dir / "episodes.lock").exists()
    assert "would add lab-02/ep-0000" in result.out
    assert "would add lab-09/by-hand" in result.out
    assert "2 would add" in result.out
    assert "would cut a torn last line (6 bytes)" in result.out


def test_second_backfill_run_adds_nothing(store: Store, backfill: Tool) -> None:
    store.drop_rows(("lab-01", "ep-0000"), ("lab-02", "ep-0002"))
    store.place("lab-09", "by-hand", make_tarball(store.commit))
    first = backfill(*store_args(store), "--json")
    index_after_first = store.index.read_bytes()
    second = backfill(*store_args(store), "--json")
    assert first.json()["summary"]["added"] == 3
    assert second.json()["summary"]["added"] == 0
    assert second.json()["summary"]["already_indexed"] == len(store.bodies) + 1
    assert store.index.read_bytes() == index_after_first


def test_unreadable_tarball_is_reported_and_skipped_with_exit_1(
    store: Store, backfill: Tool
) -> None:
    good = make_tarball(store.commit)
    store.place("lab-09", "truncated", good[: len(good) // 2])
    store.place("lab-09", "garbage", b"not a zstd stream at all")
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    store.place("lab-09", "flipped", bytes(flipped))
    store.place("lab-09", "fine", good)
    result = backfill(*store_args(store), "--json")
    assert result.code == 1
    report = result.json()
    unreadable = {item["episode_id"]: item["reason"] for item in report["unreadable"]}
    assert sorted(unreadable) == ["flipped", "garbage", "truncated"]
    assert "truncated" in unreadable["truncated"]
    assert [row["episode_id"] for row in report["added"]] == ["fine"]
    assert ("lab-09", "flipped") not in store.keys()


def test_backfill_reports_entries_that_are_not_tarballs_as_skipped(
    store: Store, backfill: Tool
) -> None:
    (store.episodes / "lab-01" / "notes.txt").write_text("x")
    (store.episodes / "lab-01" / "bad id.tar.zst").write_bytes(make_tarball(store.commit))
    (store.episodes / ".hidden-host").mkdir()
    (store.episodes / "README").write_text("x")
    result = backfill(*store_args(store), "--json")
    assert result.code == 0
    skipped = {Path(item["path"]).name: item["reason"] for item in result.json()["skipped"]}
    assert set(skipped) == {"notes.txt", "bad id.tar.zst", ".hidden-host", "README"}
    assert result.json()["summary"]["added"] == 0


def test_backfill_with_host_only_touches_that_host(store: Store, backfill: Tool) -> None:
    store.drop_rows(("lab-01", "ep-0000"), ("lab-02", "ep-0000"))
    result = backfill(*store_args(store), "--host", "lab-02", "--json")
    summary = result.json()["summary"]
    assert (summary["scanned"], summary["added"]) == (3, 1)
    assert ("lab-01", "ep-0000") not in store.keys()
    assert ("lab-02", "ep-0000") in store.keys()


def test_backfill_leaves_a_tarball_whose_upload_is_in_flight(store: Store, backfill: Tool) -> None:
    store.place("lab-09", "uploading", make_tarball(store.commit))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(store.data_dir / "episodes.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        busy = backfill(*store_args(store), "--json")
    finally:
        holder.communicate(b"")
    assert busy.code == 0
    assert busy.json()["in_flight"] == [{"host_id": "lab-09", "episode_id": "uploading"}]
    assert ("lab-09", "uploading") not in store.keys()
    assert backfill(*store_args(store), "--json").json()["summary"]["added"] == 1


# A receiver mid-upload, as far as locking goes: it holds the episode's lock until stdin closes.
_HOLD_LOCK = """
import sys
from pathlib import Path
from receiver.storage.episode_locks import EpisodeLocks
locks = EpisodeLocks(Path(sys.argv[1]))
assert locks.try_acquire("lab-09", "uploading")
print("held", flush=True)
sys.stdin.read()
"""


def test_backfill_cuts_a_torn_tail_before_appending(store: Store, backfill: Tool) -> None:
    store.drop_rows(("lab-01", "ep-0002"))
    torn = b'{"commit":"abc","episode_id":"ep-9'
    with store.index.open("ab") as handle:
        handle.write(torn)
    result = backfill(*store_args(store), "--json")
    assert result.code == 0
    assert result.json()["summary"]["torn_tail_bytes"] == len(torn)
    assert store.index.read_bytes().endswith(b"\n")
    assert len(store.rows()) == len(store.bodies)
    side_files = list(store.data_dir.glob("index.jsonl.torn-*"))
    assert [path.read_bytes() for path in side_files] == [torn]


def test_backfill_refuses_an_index_with_a_corrupt_middle_line(store: Store, backfill: Tool) -> None:
    lines = store.index.read_bytes().splitlines(keepends=True)
    store.index.write_bytes(lines[0] + b"this is not json\n" + b"".join(lines[1:]))
    before = store.index.read_bytes()
    result = backfill(*store_args(store))
    assert result.code == 2
    assert result.err.count("\n") == 1 and "line 2 is not an index row" in result.err
    assert store.index.read_bytes() == before


def test_backfill_finds_the_store_through_the_receivers_config(
    store: Store, backfill: Tool, tmp_path: Path
) -> None:
    config = receiver_config(tmp_path, None, storage={"data_dir": str(store.data_dir)})
    path = write_toml(tmp_path / "receiver.toml", config)
    store.drop_rows(("lab-02", "ep-0001"))
    result = backfill("--config", path, "--json")
    assert result.code == 0
    assert result.json()["index"] == str(store.index)
    assert result.json()["summary"]["added"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --config F, or both --episodes-root D and --index F"),
        (["--episodes-root", "EPISODES"], "both --episodes-root D and --index F"),
        (["--episodes-root", "/nonexistent/episodes", "--index", "INDEX"], "does not exist"),
        (["--episodes-root", "EPISODES", "--index", "/nonexistent/x.jsonl"], "does not exist"),
        (["--config", "CONFIG", "--index", "INDEX"], "not both"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["--episodes-root", "EPISODES", "--index", "INDEX", "--host", "../x"], "--host"),
        (["--episodes-root", "EPISODES", "--index", "INDEX", "--jobs", "0"], "--jobs"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_backfill_bad_usage_is_one_line_and_exit_2(
    store: Store, backfill: Tool, args: list[str], message: str
) -> None:
    names = {"EPISODES": str(store.episodes), "INDEX": str(store.index), "CONFIG": "x.toml"}
    result = backfill(*[names.get(arg, arg) for arg in args])
    assert result.code == 2
    assert result.err.startswith("episode-backfill: error: ")
    assert result.err.count("\n") == 1
    assert message in result.err
    assert result.out == ""


def test_backfill_takes_the_commit_from_a_single_top_level_directory(
    store: Store, backfill: Tool
) -> None:
    commit = "abcdef0123456789abcdef0123456789abcdef01"
    store.place("lab-09", "packed-by-hand", make_tarball(commit, top="packed-by-hand"))
    assert backfill(*store_args(store)).code == 0
    row = store.rows()[-1]
    assert (row["episode_id"], row["commit"]) == ("packed-by-hand", commit)
