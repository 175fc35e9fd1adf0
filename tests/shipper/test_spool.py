"""Spool entries, the settle check and reading the commit from meta.json."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from shipper.spool import (
    BadEpisode,
    Entry,
    Kind,
    entry_for,
    last_change,
    list_entries,
    read_commit,
    unpadded_commit,
)
from tests.shipper.conftest import GOOD, write_episode, write_tarball

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]


def test_entries_are_directories_and_tarballs_and_nothing_else(tmp_path: Path) -> None:
    write_episode(tmp_path, "ep-1")
    write_tarball(tmp_path, "ep-2")
    (tmp_path / ".ep-3.partial").mkdir()
    (tmp_path / ".ep-4.tar.zst").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    assert list_entries(tmp_path) == [
        Entry("ep-1", tmp_path / "ep-1", Kind.DIRECTORY),
        Entry("ep-2", tmp_path / "ep-2.tar.zst", Kind.TARBALL),
    ]
    assert entry_for(tmp_path, "missing") is None


def test_a_directory_without_meta_json_is_not_a_candidate_yet(tmp_path: Path) -> None:
    (tmp_path / "ep-1" / "data").mkdir(parents=True)
    entry = Entry("ep-1", tmp_path / "ep-1", Kind.DIRECTORY)
    assert last_change(entry) is None
    (tmp_path / "ep-1" / "meta.json").write_text("{}")
    assert last_change(entry) is not None


def test_last_change_follows_a_write_deep_inside_the_episode(tmp_path: Path) -> None:
    directory = write_episode(tmp_path, "ep-1", age=7200)
    entry = Entry("ep-1", directory, Kind.DIRECTORY)
    before = last_change(entry)
    assert before is not None
    time.sleep(0.01)
    (directory / "data" / "frames.bin").write_bytes(b"more")
    after = last_change(entry)
    assert after is not None and after > before and after >= time.time() - 5


def test_last_change_sees_copies_that_preserve_old_mtimes(tmp_path: Path) -> None:
    # rsync -a / cp -p set old mtimes; the ctime still says "just now".
    directory = write_episode(tmp_path, "ep-1")
    os.utime(directory / "meta.json", (0, 0))
    changed = last_change(Entry("ep-1", directory, Kind.DIRECTORY))
    assert changed is not None and changed >= time.time() - 60


def test_read_commit_from_a_directory_is_lower_cased(tmp_path: Path) -> None:
    directory = write_episode(tmp_path, "ep-1", commit=GOOD.upper())
    assert read_commit(Entry("ep-1", directory, Kind.DIRECTORY)) == GOOD


def test_read_commit_accepts_sha256_repositories(tmp_path: Path) -> None:
    directory = write_episode(tmp_path, "ep-1", commit="d" * 64)
    assert read_commit(Entry("ep-1", directory, Kind.DIRECTORY)) == "d" * 64


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "no code_version.commit"),
        (b'{"code_version": {}}', "no code_version.commit"),
        (b'{"code_version": {"commit": "abc"}}', "not 40 or 64 hex"),
        (b'{"code_version": {"commit": 12}}', "not 40 or 64 hex"),
    ],
)
def test_unusable_meta_json_is_reported_with_the_reason(
    tmp_path: Path, meta: bytes, message: str
) -> None:
    directory = write_episode(tmp_path, "ep-1")
    (directory / "meta.json").write_bytes(meta)
    with pytest.raises(BadEpisode, match=message):
        read_commit(Entry("ep-1", directory, Kind.DIRECTORY))


def test_read_commit_from_a_ready_tarball(tmp_path: Path) -> None:
    path = write_tarball(tmp_path, "ep-1", commit=GOOD)
    assert read_commit(Entry("ep-1", path, Kind.TARBALL)) == GOOD


def test_a_tarball_without_meta_json_at_a_known_place_is_reported(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = json.dumps({"code_version": {"commit": GOOD}}).encode()
        info = tarfile.TarInfo("nested/deeper/meta.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "ep-1.tar.zst"
    path.write_bytes(zstd.compress(buffer.getvalue()))
    with pytest.raises(BadEpisode, match="no meta.json at the top or under the single top-level"):
        read_commit(Entry("ep-1", path, Kind.TARBALL))


def test_a_file_that_is_not_tar_zst_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ep-1.tar.zst"
    path.write_bytes(b"plain text, not zstd")
    with pytest.raises(BadEpisode, match="not a readable tar.zst"):
        read_commit(Entry("ep-1", path, Kind.TARBALL))


def pack_with_system_tar(spool: Path, names: list[str], episode_id: str) -> Path:
    """A pre-packed tarball as lab scripts make it: `tar -C spool -cf - NAME...`, zstd'ed."""
    raw = subprocess.run(
        ["tar", "-C", str(spool), "-cf", "-", *names], check=True, capture_output=True
    )
    path = spool / f"{episode_id}.tar.zst"
    path.write_bytes(zstd.compress(raw.stdout))
    return path


def test_read_commit_from_a_tarball_of_one_top_level_directory(tmp_path: Path) -> None:
    write_episode(tmp_path, "ep-1", commit=GOOD)
    path = pack_with_system_tar(tmp_path, ["ep-1"], "ep-1")
    assert read_commit(Entry("ep-1", path, Kind.TARBALL)) == GOOD


def test_a_tarball_of_two_top_level_directories_is_reported(tmp_path: Path) -> None:
    write_episode(tmp_path, "ep-1", commit=GOOD)
    write_episode(tmp_path, "ep-2", commit=GOOD)
    path = pack_with_system_tar(tmp_path, ["ep-1", "ep-2"], "both")
    with pytest.raises(BadEpisode, match="several top-level entries"):
        read_commit(Entry("both", path, Kind.TARBALL))


def test_names_being_written_are_never_picked_up(tmp_path: Path) -> None:
    for name in (".ep-1", "ep-2.tmp", "ep-3.partial"):
        write_episode(tmp_path, name)
    (tmp_path / "ep-4.tar.zst.partial").write_bytes(b"")
    write_episode(tmp_path, "ep-5")
    assert [entry.episode_id for entry in list_entries(tmp_path)] == ["ep-5"]


def test_a_padded_commit_is_refused_not_trimmed(tmp_path: Path) -> None:
    # The wire rule trims; the shipper has always refused (see spool.unpadded_commit).
    assert unpadded_commit(GOOD.upper()) == GOOD
    assert unpadded_commit(f" {GOOD}") is None and unpadded_commit(f"{GOOD}\n") is None
    directory = write_episode(tmp_path, "ep-1", commit=f"{GOOD} ")
    with pytest.raises(BadEpisode, match="not 40 or 64 hex"):
        read_commit(Entry("ep-1", directory, Kind.DIRECTORY))
