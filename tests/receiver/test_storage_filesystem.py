"""The filesystem blob store: temp files off the episodes tree, commit without overwrite,
recovery."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from receiver.storage import StoredBlob, digest_stream
from receiver.storage.filesystem import FilesystemStore, FilesystemWriter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_store(tmp_path: Path) -> FilesystemStore:
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # the config layer creates data_dir (ensure_data_dir) before prepare()
    store = FilesystemStore(data_dir)
    store.prepare()
    return store


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if not path.is_dir())


def write_temp(
    store: FilesystemStore, data: bytes, episode_id: str = "ep-1", commit: str | None = COMMIT
) -> FilesystemWriter:
    writer = store.open_writer("lab-07", episode_id, commit)
    writer.write([data])
    return writer


def installed_note(store: FilesystemStore, writer: FilesystemWriter) -> StoredBlob:
    final = store.final_path(writer.host_id, writer.episode_id)
    commit = writer.path.name.split("~")[1]
    return StoredBlob(
        writer.host_id,
        writer.episode_id,
        final.stat().st_size,
        str(final),
        None if commit == "-" else commit,
        note=str(writer.path),
    )


# -- open_writer ----------------------------------------------------------------------


def test_temp_file_lives_under_tmp_host_and_never_under_episodes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = store.open_writer("lab-07", "ep-1", COMMIT)
    try:
        assert writer.path.parent == store.layout.tmp_dir / "lab-07"
        assert not writer.path.is_relative_to(store.episodes_dir)
        assert writer.path.exists()
        assert files_under(store.episodes_dir) == []
        assert (writer.host_id, writer.episode_id) == ("lab-07", "ep-1")
    finally:
        writer.abort()


def test_temp_name_carries_episode_and_commit(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with_commit = store.open_writer("lab-07", "ep-1", COMMIT)
    without = store.open_writer("lab-07", "ep-1", None)
    try:
        assert with_commit.path.name.startswith(f"ep-1~{COMMIT}~")
        assert without.path.name.startswith("ep-1~-~")
        assert with_commit.path.suffix == without.path.suffix == ".part"
        assert with_commit.path != without.path
    finally:
        with_commit.abort()
        without.abort()


def test_temp_file_uses_o_excl_and_never_reuses_an_existing_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    monkeypatch.setattr("receiver.storage.filesystem.secrets.token_hex", lambda _n: "0" * 12)
    first = write_temp(store, b"first upload")
    try:
        with pytest.raises(FileExistsError):
            store.open_writer("lab-07", "ep-1", COMMIT)
        assert first.path.read_bytes() == b"first upload"
    finally:
        first.abort()


# -- commit ---------------------------------------------------------------------------


def test_commit_links_the_temp_under_its_final_name(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = write_temp(store, b"tarball bytes")
    assert writer.commit() is True
    final = store.layout.data_dir / "episodes" / "lab-07" / "ep-1.tar.zst"
    assert store.final_path("lab-07", "ep-1") == final
    assert final.read_bytes() == b"tarball bytes"
    assert os.path.samefile(final, writer.path)  # temp name stays until the row is written
    assert store.exists("lab-07", "ep-1")
    assert store.where("lab-07", "ep-1") == str(final)


def test_commit_returns_false_and_leaves_an_existing_final_file_alone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = write_temp(store, b"first")
    assert first.commit() is True
    first.close()
    final = store.final_path("lab-07", "ep-1")
    inode_before = final.stat().st_ino
    second = write_temp(store, b"second, different")
    assert second.commit() is False
    assert final.read_bytes() == b"first"
    assert final.stat().st_ino == inode_before
    assert files_under(store.layout.tmp_dir) == []  # the loser leaves nothing


def test_abort_removes_the_temp_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = write_temp(store, b"partial")
    writer.abort()
    assert not writer.path.exists()
    writer.abort()  # twice is fine
    assert files_under(store.layout.data_dir) == []


def test_close_after_the_row_keeps_the_installed_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = write_temp(store, b"kept")
    writer.commit()
    writer.close()
    assert not writer.path.exists()
    assert store.final_path("lab-07", "ep-1").read_bytes() == b"kept"


def test_digest_of_an_installed_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    write_temp(store, b"some bytes").commit()
    assert store.digest("lab-07", "ep-1") == (hashlib.sha256(b"some bytes").hexdigest(), 10)


# -- recover --------------------------------------------------------------------------


def test_recover_returns_a_note_for_an_installed_temp(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = write_temp(store, b"installed, row maybe missing")
    writer.commit()
    assert store.recover() == [installed_note(store, writer)]
    assert writer.path.exists()  # kept: forget_note() removes it once the row is written
    store.forget_note(installed_note(store, writer))
    assert not writer.path.exists()


def test_recover_note_without_commit_has_commit_none(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    write_temp(store, b"no commit", commit=None).commit()
    [found] = store.recover()
    assert found.commit is None
    assert found.episode_id == "ep-1"


def test_recover_removes_every_other_temp_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    installed = write_temp(store, b"installed", episode_id="ep-ok")
    installed.commit()
    write_temp(store, b"never installed", episode_id="ep-stale")._close_fd()
    # A temp for an id whose final file is another upload's (a lost conflict).
    write_temp(store, b"other content", episode_id="ep-ok")._close_fd()
    host_tmp = store.layout.tmp_dir / "lab-07"
    garbage = [
        host_tmp / "notes.txt",
        host_tmp / "ep-x.part",
        host_tmp / "a~b~c~d.part",
        host_tmp / "ep-ok~",
    ]
    for path in garbage:
        path.write_bytes(b"junk")
    stray = store.layout.tmp_dir / "stray-file"
    stray.write_bytes(b"junk")

    found = store.recover()

    assert found == [installed_note(store, installed)]
    assert files_under(store.layout.tmp_dir) == [installed.path]
    assert store.final_path("lab-07", "ep-ok").read_bytes() == b"installed"


def test_recover_of_an_empty_or_missing_tmp_dir_returns_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    store = FilesystemStore(tmp_path / "data")
    assert store.recover() == []
    store.prepare()
    assert store.recover() == []


# -- digest_stream --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 2 * 1024 * 1024 + 12345])
def test_digest_stream_matches_hashlib(size: int) -> None:
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    assert digest_stream(io.BytesIO(data)) == (hashlib.sha256(data).hexdigest(), size)
