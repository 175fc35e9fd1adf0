"""episode-verify on stores a real receiver wrote, damaged in each way it must report."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from receiver.storage.rows import encode_row, new_row
from tests.support import make_tarball, receiver_config, write_toml
from tests.tools.conftest import Store, Tool, store_args


def test_verify_of_an_untouched_store_is_clean(store: Store, verify_tool: Tool) -> None:
    result = verify_tool("--data-dir", store.data_dir)
    assert result.code == 0, result.out
    assert result.out.strip().endswith(": clean")
    assert f"{len(store.bodies)} rows, {len(store.bodies)} files" in result.out


def test_deleted_tarball_is_reported_missing(store: Store, verify_tool: Tool) -> None:
    store.tarball("lab-01", "ep-0001").unlink()
    report = verify_tool("--data-dir", store.data_dir, "--json")
    assert report.code == 1
    missing = report.json()["missing"]
    assert [(item["host_id"], item["episode_id"]) for item in missing] == [("lab-01", "ep-0001")]
    assert missing[0]["path"] == str(store.tarball("lab-01", "ep-0001"))
    assert report.json()["summary"]["problems"] == 1


def test_flipped_byte_is_a_sha256_mismatch(store: Store, verify_tool: Tool) -> None:
    path = store.tarball("lab-02", "ep-0002")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_tool("--data-dir", store.data_dir, "--json").json()
    assert [item["episode_id"] for item in report["sha256_mismatch"]] == ["ep-0002"]
    mismatch = report["sha256_mismatch"][0]
    assert (
        mismatch["index_sha256"] == hashlib.sha256(store.bodies[("lab-02", "ep-0002")]).hexdigest()
    )
    assert mismatch["file_sha256"] == hashlib.sha256(data).hexdigest()
    assert report["size_mismatch"] == []


def test_truncated_tarball_is_a_size_mismatch(store: Store, verify_tool: Tool) -> None:
    path = store.tarball("lab-01", "ep-0000")
    os.truncate(path, 200)
    report = verify_tool("--data-dir", store.data_dir, "--json")
    assert report.code == 1
    mismatch = report.json()["size_mismatch"]
    assert [(m["episode_id"], m["file_size_bytes"]) for m in mismatch] == [("ep-0000", 200)]
    assert report.json()["sha256_mismatch"] == []


def test_quick_checks_sizes_but_does_not_hash(store: Store, verify_tool: Tool) -> None:
    flipped = store.tarball("lab-02", "ep-0000")
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x01
    flipped.write_bytes(bytes(data))
    os.truncate(store.tarball("lab-02", "ep-0001"), 10)
    report = verify_tool("--data-dir", store.data_dir, "--quick", "--json").json()
    assert [m["episode_id"] for m in report["size_mismatch"]] == ["ep-0001"]
    assert report["sha256_mismatch"] == []
    assert report["summary"]["bytes_read"] == 0


def test_hand_placed_tarball_is_reported_orphaned(store: Store, verify_tool: Tool) -> None:
    body = make_tarball(store.commit)
    store.place("lab-09", "by-hand", body)
    result = verify_tool("--data-dir", store.data_dir)
    assert result.code == 1
    assert f"orphaned lab-09/by-hand: {store.tarball('lab-09', 'by-hand')} ({len(body)} bytes)" in (
        result.out
    )


def test_deleted_row_is_reported_orphaned_then_clean_after_backfill(
    store: Store, verify_tool: Tool, backfill: Tool
) -> None:
    store.drop_rows(("lab-02", "ep-0001"))
    orphaned = verify_tool("--data-dir", store.data_dir, "--json").json()["orphaned"]
    assert [(item["host_id"], item["episode_id"]) for item in orphaned] == [("lab-02", "ep-0001")]
    assert backfill(*store_args(store)).code == 0
    assert verify_tool("--data-dir", store.data_dir).code == 0


def test_duplicate_rows_are_reported_with_their_lines(store: Store, verify_tool: Tool) -> None:
    lines = store.index.read_bytes().splitlines(keepends=True)
    other = new_row("lab-01", "ep-0000", "f" * 64, 1, None)
    store.index.write_bytes(b"".join(lines) + lines[1] + encode_row(other))
    result = verify_tool("--data-dir", store.data_dir, "--json")
    assert result.code == 1
    duplicates = {(d["host_id"], d["episode_id"]): d for d in result.json()["duplicates"]}
    first_key = (store.rows()[0]["host_id"], store.rows()[0]["episode_id"])
    second_key = (store.rows()[1]["host_id"], store.rows()[1]["episode_id"])
    assert duplicates[second_key]["lines"] == [2, len(lines) + 1]
    assert duplicates[second_key]["same_content"] is True
    assert duplicates[first_key]["same_content"] is False
    # The first row is the one in force, and it matches the file: no mismatch on top.
    assert result.json()["sha256_mismatch"] == result.json()["size_mismatch"] == []


def test_torn_tail_and_bad_lines_are_reported_and_left_alone(
    store: Store, verify_tool: Tool
) -> None:
    lines = store.index.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + b"not json\n" + b'{"host_id": "x"}\n' + b"".join(lines[1:]) + b'{"com'
    store.index.write_bytes(damaged)
    result = verify_tool("--data-dir", store.data_dir, "--json")
    assert result.code == 1
    report = result.json()
    assert [bad["line"] for bad in report["bad_lines"]] == [2, 3]
    assert report["bad_lines"][0]["preview"] == "not json"
    assert report["torn_tail"] == {"line": len(lines) + 3, "bytes": 5}
    assert report["summary"]["problems"] == 3
    assert store.index.read_bytes() == damaged
    assert list(store.data_dir.glob("index.jsonl.torn-*")) == []


def test_verify_changes_nothing_in_the_store(store: Store, verify_tool: Tool) -> None:
    store.tarball("lab-01", "ep-0001").unlink()
    store.place("lab-09", "by-hand", make_tarball(store.commit))
    with store.index.open("ab") as handle:
        handle.write(b'{"torn')
    for lock in ("index.jsonl.lock", "episodes.lock"):
        (store.data_dir / lock).unlink()
    before = _tree(store.data_dir)
    assert verify_tool("--data-dir", store.data_dir).code == 1
    assert _tree(store.data_dir) == before


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_unparseable_row_with_unsafe_id_is_a_bad_line(store: Store, verify_tool: Tool) -> None:
    escaping = new_row("..", "passwd", "0" * 64, 1, None)
    with store.index.open("ab") as handle:
        handle.write(encode_row(escaping))
    report = verify_tool("--data-dir", store.data_dir, "--json").json()
    assert len(report["bad_lines"]) == 1 and "host_id" in report["bad_lines"][0]["error"]
    assert report["missing"] == []


def test_host_option_limits_the_audit_to_one_host(store: Store, verify_tool: Tool) -> None:
    store.tarball("lab-01", "ep-0000").unlink()
    only_lab_02 = verify_tool("--data-dir", store.data_dir, "--host", "lab-02", "--json")
    assert only_lab_02.code == 0
    assert only_lab_02.json()["summary"]["files"] == 3
    assert verify_tool("--data-dir", store.data_dir, "--host", "lab-01").code == 1


def test_verify_reads_the_data_dir_from_the_receivers_config(
    store: Store, verify_tool: Tool, tmp_path: Path
) -> None:
    config = receiver_config(tmp_path, None, storage={"data_dir": str(store.data_dir)})
    result = verify_tool("--config", write_toml(tmp_path / "r.toml", config), "--json")
    assert result.code == 0
    assert result.json()["index"] == str(store.index)


def test_empty_data_dir_is_clean(tmp_path: Path, verify_tool: Tool) -> None:
    assert verify_tool("--data-dir", tmp_path).code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of the arguments --data-dir --config is required"),
        (["--data-dir", "/nonexistent/data"], "does not exist"),
        (["--data-dir", "DATA", "--config", "x.toml"], "not allowed with"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["--data-dir", "DATA", "--host", "a/b"], "--host"),
        (["--data-dir", "DATA", "--jobs", "-1"], "--jobs"),
    ],
)
def test_verify_bad_usage_is_one_line_and_exit_2(
    store: Store, verify_tool: Tool, args: list[str], message: str
) -> None:
    result = verify_tool(*[str(store.data_dir) if arg == "DATA" else arg for arg in args])
    assert result.code == 2
    assert result.err.startswith("episode-verify: error: ")
    assert result.err.count("\n") == 1
    assert message in result.err
