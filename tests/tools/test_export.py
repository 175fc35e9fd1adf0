"""episode-index export: the catalogue's rows appended to FILE in order, once each, resumable."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from receiver.storage import encode_row, new_row
from tests.conftest import StartReceiver
from tests.support import PROJECT_ROOT, head_commits, make_tarball, receiver_config, write_toml
from tests.tools.conftest import Store


def config_for(store: Store, tmp_path: Path) -> Path:
    config = receiver_config(tmp_path, None)
    config["storage"]["data_dir"] = str(store.data_dir)
    return write_toml(tmp_path / "receiver.toml", config)


def export(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tools.index_export", "export", "--config", str(config)]
    return subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT
    )


def test_export_copies_every_row_in_order_and_a_second_run_adds_none(
    store: Store, tmp_path: Path
) -> None:
    config, out = config_for(store, tmp_path), tmp_path / "export.jsonl"
    first = export(config, out)
    assert first.returncode == 0, first.stderr
    assert out.read_bytes() == store.index.read_bytes()  # the same rows, the same bytes
    assert f"appended {len(store.rows())} rows" in first.stdout
    again = export(config, out)
    assert again.returncode == 0 and "appended 0 rows" in again.stdout
    assert out.read_bytes() == store.index.read_bytes()


def test_export_resumes_after_a_torn_last_line_without_duplicating_or_skipping(
    store: Store, tmp_path: Path
) -> None:
    config, out = config_for(store, tmp_path), tmp_path / "export.jsonl"
    lines = store.index.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # killed in the middle of row 3
    result = export(config, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"".join(lines)


def test_export_skips_a_duplicate_row_as_the_catalogue_does(store: Store, tmp_path: Path) -> None:
    config, out = config_for(store, tmp_path), tmp_path / "export.jsonl"
    first = store.rows()[0]
    duplicate = new_row(first["host_id"], first["episode_id"], "f" * 64, 1, None)
    with store.index.open("ab") as handle:
        handle.write(encode_row(duplicate))  # a writer that ignored the lock
    assert export(config, out).returncode == 0
    keys = [(r["host_id"], r["episode_id"]) for r in map(json.loads, out.read_bytes().splitlines())]
    assert len(keys) == len(set(keys)) == len(store.bodies)


def test_a_second_export_to_the_same_file_refuses_at_once(store: Store, tmp_path: Path) -> None:
    config, out = config_for(store, tmp_path), tmp_path / "export.jsonl"
    fd = os.open(tmp_path / "export.jsonl.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running export holds it
        refused = export(config, out)
    finally:
        os.close(fd)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(f"another export to {out} is running")
    assert not out.exists() or out.read_bytes() == b""


def test_export_refuses_a_file_whose_rows_are_not_from_this_catalogue(
    store: Store, tmp_path: Path
) -> None:
    config, out = config_for(store, tmp_path), tmp_path / "export.jsonl"
    out.write_bytes(encode_row(new_row("elsewhere", "ep-9", "a" * 64, 1, None)))
    result = export(config, out)
    assert result.returncode == 1 and "elsewhere/ep-9" in result.stderr
    assert export(config, store.index).returncode == 2  # never onto the index itself


def test_export_while_a_receiver_appends_gets_every_row_once(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    config, out = receiver.config_path, tmp_path / "export.jsonl"
    head = head_commits(repo, 1)[0]
    for number in range(30):
        body = make_tarball(head)
        url = f"{receiver.url}/episodes/lab-01/ep-{number}"
        assert httpx.put(url, content=body, headers={"X-Code-Commit": head}).status_code == 201
        if number % 10 == 0:
            assert export(config, out).returncode == 0
    assert export(config, out).returncode == 0
    index = tmp_path / "data" / "index.jsonl"
    assert out.read_bytes() == index.read_bytes()
