"""receiver.store: temp files off the episodes tree, install without overwrite, recovery."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from receiver.store import FilesystemStore, Intent, TempBlob, file_digest

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
) -> TempBlob:
    blob = store.create_temp("lab-07", episode_id, commit)
    os.write(blob.fd, data)
    return blob


# -- create_temp ----------------------------------------------------------------------


def test_create_temp_lives_under_tmp_host_and_never_under_episodes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = store.create_temp("lab-07", "ep-1", COMMIT)
    try:
        assert blob.path.parent == store.data_dir / "tmp" / "lab-07"
        assert not blob.path.is_relative_to(store.episodes_dir)
        assert blob.path.exists()
        assert files_under(store.episodes_dir) == []
        assert (blob.host_id, blob.episode_id) == ("lab-07", "ep-1")
    finally:
        store.discard(blob)


def test_create_temp_name_carries_episode_and_commit(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with_commit = store.create_temp("lab-07", "ep-1", COMMIT)
    without = store.create_temp("lab-07", "ep-1", None)
    try:
        assert with_commit.path.name.startswith(f"ep-1~{COMMIT}~")
        assert without.path.name.startswith("ep-1~-~")
        assert with_commit.path.suffix == without.path.suffix == ".part"
        assert with_commit.path != without.path
    finally:
        store.discard(with_commit)
        store.discard(without)


def test_create_temp_uses_o_excl_and_never_reuses_an_existing_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    monkeypatch.setattr("receiver.store.secrets.token_hex", lambda _n: "000000000000")
    first = write_temp(store, b"first upload")
    try:
        with pytest.raises(FileExistsError):
            store.create_temp("lab-07", "ep-1", COMMIT)
        assert first.path.read_bytes() == b"first upload"
    finally:
        store.discard(first)


# -- install --------------------------------------------------------------------------


def test_install_links_the_temp_under_its_final_name(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"tarball bytes")
    assert store.install(blob) is True
    final = store.data_dir / "episodes" / "lab-07" / "ep-1.tar.zst"
    assert store.final_path("lab-07", "ep-1") == final
    assert final.read_bytes() == b"tarball bytes"
    assert os.path.samefile(final, blob.path)  # temp name stays until the row is written
    assert store.exists("lab-07", "ep-1")
    assert blob.fd == -1


def test_install_returns_false_and_leaves_an_existing_final_file_alone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = write_temp(store, b"first")
    assert store.install(first) is True
    store.forget_temp(first)
    final = store.final_path("lab-07", "ep-1")
    inode_before = final.stat().st_ino
    second = write_temp(store, b"second, different")
    assert store.install(second) is False
    assert final.read_bytes() == b"first"
    assert final.stat().st_ino == inode_before
    store.discard(second)
    assert files_under(store.tmp_dir) == []


def test_discard_removes_the_temp_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"partial")
    store.discard(blob)
    assert not blob.path.exists()
    assert blob.fd == -1
    store.discard(blob)  # twice is fine
    assert files_under(store.data_dir) == []


def test_forget_temp_keeps_the_installed_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"kept")
    store.install(blob)
    store.forget_temp(blob)
    assert not blob.path.exists()
    assert store.final_path("lab-07", "ep-1").read_bytes() == b"kept"


def test_digest_of_an_installed_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"some bytes")
    store.install(blob)
    assert store.digest("lab-07", "ep-1") == (hashlib.sha256(b"some bytes").hexdigest(), 10)


# -- recover --------------------------------------------------------------------------


def test_recover_returns_an_intent_for_an_installed_temp(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"installed, row maybe missing")
    store.install(blob)
    assert store.recover() == [Intent("lab-07", "ep-1", COMMIT, blob.path)]
    assert blob.path.exists()  # kept: the caller removes it once the row is written


def test_recover_intent_without_commit_has_commit_none(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blob = write_temp(store, b"no commit", commit=None)
    store.install(blob)
    [intent] = store.recover()
    assert intent.commit is None
    assert intent.episode_id == "ep-1"


def test_recover_removes_every_other_temp_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    installed = write_temp(store, b"installed", episode_id="ep-ok")
    store.install(installed)
    stale = write_temp(store, b"never installed", episode_id="ep-stale")
    os.close(stale.fd)
    # A temp for an id whose final file is another upload's (a lost conflict).
    loser = write_temp(store, b"other content", episode_id="ep-ok")
    os.close(loser.fd)
    host_tmp = store.tmp_dir / "lab-07"
    garbage = [
        host_tmp / "notes.txt",
        host_tmp / "ep-x.part",
        host_tmp / "a~b~c~d.part",
        host_tmp / "ep-ok~",
    ]
    for path in garbage:
        path.write_bytes(b"junk")
    stray = store.tmp_dir / "stray-file"
    stray.write_bytes(b"junk")

    intents = store.recover()

    assert intents == [Intent("lab-07", "ep-ok", COMMIT, installed.path)]
    assert files_under(store.tmp_dir) == [installed.path]
    assert store.final_path("lab-07", "ep-ok").read_bytes() == b"installed"


def test_recover_of_an_empty_or_missing_tmp_dir_returns_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    store = FilesystemStore(tmp_path / "data")
    assert store.recover() == []
    store.prepare()
    assert store.recover() == []


# -- file_digest ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 2 * 1024 * 1024 + 12345])
def test_file_digest_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_digest(path) == (hashlib.sha256(data).hexdigest(), size)
