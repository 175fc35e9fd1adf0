"""The index's SQLite view against a real receiver: damaged, deleted, outrun or outlived.

index.jsonl is the record; whatever happens to the view between starts, a restarted
receiver answers from the file's rows (HEAD, /healthz, the status page) and keeps
appending exactly one row per episode.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.rows import decode_row
from tests.reliability.conftest import Receiver, episode, sha256
from tests.reliability.invariants import check_invariants

HOST = "lab-1"


def upload_some(receiver: Receiver, commit: str, names: list[str]) -> dict[tuple[str, str], str]:
    acked = {}
    for number, name in enumerate(names):
        body = episode(commit, seed=number + 100 * len(name))
        assert receiver.put(HOST, name, body, commit).status_code == 201
        acked[(HOST, name)] = sha256(body)
    return acked


def index_rows(receiver: Receiver) -> int:
    rows = httpx.get(f"{receiver.url}/healthz", timeout=10).json()["index_rows"]
    assert isinstance(rows, int)
    return rows


def head(receiver: Receiver, name: str) -> int:
    return httpx.head(f"{receiver.url}/episodes/{HOST}/{name}", timeout=10).status_code


def view_file(data: Path) -> Path:
    return data / "index.view.sqlite3"


def damage(view: Path, how: str) -> None:
    if how == "deleted":
        view.unlink()
    elif how == "truncated":
        with view.open("r+b") as handle:
            handle.truncate(os.path.getsize(view) // 2)
    elif how == "emptied":
        view.write_bytes(b"")
    else:
        view.write_bytes(os.urandom(64 * 1024))


@pytest.mark.parametrize("how", ["deleted", "truncated", "emptied", "garbage"])
def test_a_damaged_view_is_rebuilt_at_start(
    how: str, receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver.start()
    # Enough rows that the view spans several pages, so a cut loses some of them.
    acked = upload_some(receiver, commit, [f"ep-{n:03d}-{'x' * 90}" for n in range(40)])
    receiver.stop()
    assert not Path(f"{view_file(receiver.data_dir)}-wal").exists()  # a clean stop checkpoints
    damage(view_file(receiver.data_dir), how)

    receiver.start()
    assert index_rows(receiver) == 40
    assert all(head(receiver, key[1]) == 200 for key in acked)
    acked |= upload_some(receiver, commit, ["after"])
    assert index_rows(receiver) == 41
    page = httpx.get(f"{receiver.url}/", timeout=10).text
    assert f'data-host="{HOST}"' in page and ">41<" in page
    receiver.stop()
    check_invariants(receiver.data_dir, acked, after_restart=True)


def test_an_index_replaced_between_starts_is_what_the_receiver_serves(
    receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver.start()
    upload_some(receiver, commit, ["one", "two", "three"])
    receiver.stop()
    index = receiver.data_dir / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    # Restored from an older copy: another file (inode), holding only the first two rows.
    restored = index.with_name("restored")
    restored.write_bytes(b"".join(lines[:2]))
    os.replace(restored, index)

    receiver.start()
    assert index_rows(receiver) == 2
    # The third tarball is still stored: asking for it indexes it again (repair on access).
    assert head(receiver, "three") == 200
    assert index_rows(receiver) == 3
    receiver.stop()
    keys = [decode_row(line).key for line in index.read_bytes().splitlines(keepends=True)]
    assert sorted(keys) == [(HOST, "one"), (HOST, "three"), (HOST, "two")]


def test_a_torn_tail_cut_at_start_leaves_the_view_in_step(
    receiver: Receiver, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver.start()
    acked = upload_some(receiver, commit, ["one", "two"])
    receiver.stop()
    index = receiver.data_dir / "index.jsonl"
    with index.open("ab") as handle:
        handle.write(b'{"commit": "dead')  # a writer died mid-append

    receiver.start()
    assert index_rows(receiver) == 2
    acked |= upload_some(receiver, commit, ["three"])
    assert [head(receiver, name) for name in ("one", "two", "three")] == [200, 200, 200]
    receiver.stop()
    assert len(list(receiver.data_dir.glob("index.jsonl.torn-*"))) == 1
    check_invariants(receiver.data_dir, acked, after_restart=True)
    catalogue = JsonlCatalogue(index)
    assert catalogue.refresh().offset == index.stat().st_size  # current, not rebuilt
    catalogue.close()


def test_rejections_and_stale_marks_survive_a_restart_and_are_every_workers(
    tmp_path: Path, gate_repo: tuple[Path, str]
) -> None:
    _, commit = gate_repo
    receiver = Receiver(tmp_path, gate_repo[0], server={"workers": 2})
    try:
        receiver.start()
        unknown = "0" * 40
        assert receiver.put("lab-old", "ep-refused", episode(unknown), unknown).status_code == 412
        upload_some(receiver, commit, ["kept"])
        receiver.stop()
        receiver.start()
        # Each request may reach either worker: every one of them shows the same.
        pages = [httpx.get(f"{receiver.url}/", timeout=10).text for _ in range(6)]
        for page in pages:
            assert 'data-host="lab-old" data-state="stale"' in page, page[page.index("<h2>") :]
            assert 'data-reason="unknown-commit"' in page and "ep-refused" in page
            assert f'data-commit="{commit}"' in page  # the dataset-by-commit chart
    finally:
        receiver.kill()
