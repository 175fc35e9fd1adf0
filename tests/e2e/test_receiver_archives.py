"""The archive layouts lab scripts make, and emergency collect mode, against a real receiver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import StartReceiver
from tests.support import head_commits, make_tarball

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

LOOKED_FOR = "no meta.json at the top or under the single top-level directory"


def spool_episode(spool: Path, episode_id: str, commit: str | None) -> None:
    (spool / episode_id / "data").mkdir(parents=True)
    (spool / episode_id / "data" / "obs.txt").write_text("observations\n")
    meta: dict[str, object] = {"episode_id": episode_id}
    if commit is not None:
        meta["code_version"] = {"commit": commit}
    (spool / episode_id / "meta.json").write_text(json.dumps(meta))


def system_tar(spool: Path, *names: str) -> bytes:
    """`tar -C spool -cf - NAME... | zstd`, the way most lab scripts pack an episode."""
    packed = subprocess.run(["tar", "-C", str(spool), "-cf", "-", *names], capture_output=True)
    assert packed.returncode == 0, packed.stderr
    compressed: bytes = zstd.compress(packed.stdout)
    return compressed


def rows(data_dir: Path) -> list[dict[str, object]]:
    index = data_dir / "index.jsonl"
    return [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []


def put(url: str, path: str, body: bytes, commit: str | None = None) -> httpx.Response:
    headers = {"X-Code-Commit": commit} if commit is not None else {}
    return httpx.put(url + path, content=body, headers=headers, timeout=30)


def test_an_episode_packed_as_one_top_level_directory_is_stored(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    spool_episode(tmp_path / "spool", "ep-0001", head)
    response = put(
        receiver.url, "/episodes/lab-07/ep-0001", system_tar(tmp_path / "spool", "ep-0001"), head
    )
    assert response.status_code == 201, response.text
    assert rows(tmp_path / "data")[0]["commit"] == head


def test_two_top_level_directories_are_refused_saying_where_meta_json_was_looked_for(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    for name in ("ep-1", "ep-2"):
        spool_episode(tmp_path / "spool", name, head)
    body = system_tar(tmp_path / "spool", "ep-1", "ep-2")
    response = put(receiver.url, "/episodes/lab-07/ep-1", body, head)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-tarball"
    assert response.json()["detail"].startswith(LOOKED_FOR)
    assert rows(tmp_path / "data") == []
    assert not (tmp_path / "data" / "episodes" / "lab-07").exists()


def test_gate_off_stores_an_episode_that_names_no_commit_anywhere(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(None)
    spool_episode(tmp_path / "spool", "no-commit", None)
    body = system_tar(tmp_path / "spool", "no-commit")
    response = put(receiver.url, "/episodes/h/no-commit", body)
    assert response.status_code == 201, response.text
    assert response.json()["commit"] is None
    assert "commit" not in rows(tmp_path / "data")[0]
    # The archive rule still holds: without meta.json at all it is not an episode.
    no_meta = put(receiver.url, "/episodes/h/no-meta", make_tarball(None))
    assert no_meta.status_code == 400 and no_meta.json()["error"] == "invalid-tarball"
    disagree = put(receiver.url, "/episodes/h/e2", make_tarball("c" * 40), "d" * 40)
    assert disagree.status_code == 400 and disagree.json()["error"] == "commit-mismatch"


def test_gate_on_still_refuses_a_meta_json_without_a_commit(
    tmp_path: Path, repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo)
    head = head_commits(repo, 1)[0]
    body = make_tarball(None, {"meta.json": b'{"episode_id": "x"}'})
    response = put(receiver.url, "/episodes/h/e", body, head)
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid-tarball",
        "detail": "meta.json has no code_version.commit",
    }
