"""The daemon against a scripted receiver (httpx.MockTransport): outcomes end to end."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import re
import tarfile
from pathlib import Path

import httpx
import pytest

from shipper.backoff import ReceiverHealth
from shipper.daemon import Daemon
from shipper.queue import Queue
from shipper.report import render_text, status_document
from shipper.states import State
from shipper.upload import ReceiverClient
from tests.shipper.conftest import (
    GOOD,
    OLD,
    REMEDIATION,
    FakeReceiver,
    make_config,
    ship_once,
    write_episode,
    write_tarball,
)

try:
    from compression import zstd  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef, unused-ignore]


def test_ships_directories_and_ready_tarballs(tmp_path: Path, receiver: FakeReceiver) -> None:
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "ep-1", files={"data/a.bin": b"a" * 5000})
    write_tarball(config.spool_dir, "ep-2")
    result = ship_once(config, receiver)
    assert result.counts["shipped"] == 2 and result.counts["fatal"] == 0
    with tarfile.open(fileobj=io.BytesIO(zstd.decompress(receiver.stored["lab-01/ep-1"]))) as tar:
        assert sorted(tar.getnames()) == ["data", "data/a.bin", "meta.json"]
    assert receiver.stored["lab-01/ep-2"] == (config.spool_dir / "ep-2.tar.zst").read_bytes()


def test_upload_sends_head_first_then_put_with_the_contract_headers(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = make_config(tmp_path, token_file=None)
    write_episode(config.spool_dir, "ep-1", commit=GOOD.upper())
    ship_once(config, receiver, token="s3cret")
    head, put = receiver.requests
    assert (head.method, put.method) == ("HEAD", "PUT")
    assert head.path == put.path == "/episodes/lab-01/ep-1"
    assert head.headers["x-code-commit"] == put.headers["x-code-commit"] == GOOD
    assert put.headers["authorization"] == "Bearer s3cret"
    digest = base64.b64encode(hashlib.sha256(put.body).digest()).decode()
    assert put.headers["content-digest"] == f"sha-256=:{digest}:"
    assert put.headers["content-length"] == str(len(put.body))
    assert head.body == b""


def test_the_commit_header_name_is_configurable(tmp_path: Path) -> None:
    receiver = FakeReceiver(commit_header="X-Lab-Commit")
    config = make_config(tmp_path, commit_header="X-Lab-Commit")
    write_episode(config.spool_dir, "ep-1")
    assert ship_once(config, receiver).counts["shipped"] == 1
    assert receiver.puts()[0].headers["x-lab-commit"] == GOOD
    assert "x-code-commit" not in receiver.puts()[0].headers


def test_an_episode_already_stored_is_confirmed_by_head_without_a_body(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "ep-1")
    first = ship_once(config, FakeReceiver())
    assert first.counts["shipped"] == 1
    # Same bytes on a second receiver, as after a crash before "shipped" was recorded.
    (tmp_path / "state" / "queue.db").unlink()
    for leftover in (tmp_path / "state").glob("queue.db-*"):
        leftover.unlink()
    packed = (tmp_path / "state" / "packed").iterdir()
    assert list(packed) == []
    from shipper.pack import pack_directory

    (tmp_path / "elsewhere").mkdir()
    body = pack_directory(config.spool_dir / "ep-1", tmp_path / "elsewhere", "ep-1").path
    receiver.stored["lab-01/ep-1"] = body.read_bytes()
    result = ship_once(config, receiver)
    assert result.counts["shipped"] == 1
    assert [r.method for r in receiver.requests] == ["HEAD"]


def test_a_stale_commit_is_fatal_for_all_its_episodes_without_any_body(
    tmp_path: Path, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    for n in range(4):
        write_episode(config.spool_dir, f"old-{n}", commit=OLD)
    write_episode(config.spool_dir, "good-1", commit=GOOD)
    with caplog.at_level(logging.ERROR):
        result = ship_once(config, receiver)
    assert result.counts["fatal"] == 4 and result.counts["shipped"] == 1
    assert [p.path for p in receiver.puts()] == ["/episodes/lab-01/good-1"]
    heads = [r for r in receiver.requests if r.method == "HEAD" and "old" in r.path]
    assert len(heads) == 1, "only the first episode of a refused commit asks the receiver"
    for n in range(4):
        episode = result.episodes[f"old-{n}"]
        assert episode.state is State.FATAL and episode.remediation == REMEDIATION
        assert (config.spool_dir / f"old-{n}" / "meta.json").exists()
    blocks = [r for r in caplog.records if REMEDIATION.rstrip() in r.getMessage()]
    assert len(blocks) == 1 and blocks[0].levelno == logging.ERROR
    # Parked directories are still the copy; packed ones of ours are not kept.
    assert list((config.state_dir / "packed").iterdir()) == []


def test_a_412_answer_to_put_also_parks_the_commit(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    receiver.script = [
        httpx.Response(404),
        httpx.Response(412, json={"error": "unknown-commit", "remediation": "push it\n"}),
    ]
    config = make_config(tmp_path, concurrency=1)
    write_episode(config.spool_dir, "ep-1", commit=GOOD)
    write_episode(config.spool_dir, "ep-2", commit=GOOD)
    result = ship_once(config, receiver)
    assert result.counts["fatal"] == 2 and len(receiver.puts()) == 1
    assert result.episodes["ep-2"].remediation == "push it\n"
    assert "unknown-commit" in str(result.episodes["ep-2"].last_error)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid-tarball"),
        (409, "conflict"),
        (413, "too-large"),
    ],
)
def test_client_errors_park_the_episode_with_the_reason_and_keep_it(
    tmp_path: Path, status: int, code: str
) -> None:
    receiver = FakeReceiver()
    receiver.script = [httpx.Response(404), httpx.Response(status, json={"error": code})]
    config = make_config(tmp_path, retention={"delete_after_days": 0})
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    episode = result.episodes["ep-1"]
    assert episode.state is State.FATAL and code in str(episode.last_error)
    assert (config.spool_dir / "ep-1" / "meta.json").exists()


def test_a_2xx_with_another_sha256_is_never_taken_for_shipped(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    receiver.script = [httpx.Response(404), httpx.Response(201, json={"sha256": "0" * 64})]
    config = make_config(tmp_path, retention={"delete_after_days": 0})
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    assert result.episodes["ep-1"].state is State.FATAL
    assert (config.spool_dir / "ep-1").is_dir()


def test_digest_mismatch_rehashes_and_retries(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    mismatch = httpx.Response(400, json={"error": "digest-mismatch"})
    receiver.script = [httpx.Response(404), mismatch]
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    assert result.episodes["ep-1"].state is State.SHIPPED
    assert len(receiver.puts()) == 2


def test_digest_mismatch_becomes_fatal_after_the_configured_retries(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    mismatch = httpx.Response(400, json={"error": "digest-mismatch"})
    receiver.script = [r for _ in range(3) for r in (httpx.Response(404), mismatch)]
    config = make_config(tmp_path, retry={"digest_mismatch_attempts": 2})
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    assert result.episodes["ep-1"].state is State.FATAL
    assert "digest-mismatch" in str(result.episodes["ep-1"].last_error)
    assert len(receiver.puts()) == 3


def test_invalid_digest_is_fatal_at_once_without_a_rehash(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    invalid = httpx.Response(400, json={"error": "invalid-digest", "detail": "not a dictionary"})
    receiver.script = [httpx.Response(404), invalid, httpx.Response(404), invalid]
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    assert result.episodes["ep-1"].state is State.FATAL
    assert "invalid-digest" in str(result.episodes["ep-1"].last_error)
    assert len(receiver.puts()) == 1


def test_a_receiver_that_is_down_is_probed_once_not_hammered(tmp_path: Path) -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ConnectError("connection refused", request=request)

    config = make_config(tmp_path, concurrency=4, retry={"base_seconds": 60, "max_seconds": 60})
    # The jitter draw is fixed so the backoff (60 s) outlasts this run.
    health = ReceiverHealth(60.0, 60.0, draw=lambda: 1.0)
    for n in range(6):
        write_episode(config.spool_dir, f"ep-{n}")
    queue = Queue.open(config.state_dir)

    async def go() -> None:
        client = ReceiverClient(
            config.receiver_url,
            config.host_id,
            commit_header=config.commit_header,
            token=None,
            timeout_seconds=5.0,
            transport=httpx.MockTransport(refuse),
        )
        await Daemon(config, queue, client, once=True, health=health).run(asyncio.Event())
        await client.aclose()

    asyncio.run(go())
    assert calls == ["HEAD"], "after the first refusal the others wait for the probe"
    counts = queue.counts()
    assert counts[State.SHIPPED] == 0 and counts[State.FATAL] == 0
    waiting = [e for e in queue.unshipped() if e.state is State.RETRY_WAIT]
    assert [e.episode_id for e in waiting] == ["ep-0"]
    assert "ConnectError" in str(waiting[0].last_error)
    receiver_state = queue.receiver()
    assert receiver_state is not None and receiver_state.failures == 1
    queue.close()
    # The receiver comes back: the next run ships everything (`once` ignores backoff).
    receiver = FakeReceiver()
    result = ship_once(config, receiver)
    assert result.counts["shipped"] == 6


def test_retry_after_from_a_503_sets_the_next_attempt(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    receiver.script = [httpx.Response(503, headers={"Retry-After": "120"}, json={"error": "x"})]
    config = make_config(tmp_path, retry={"base_seconds": 0.01, "max_seconds": 300})
    write_episode(config.spool_dir, "ep-1")
    result = ship_once(config, receiver)
    episode = result.episodes["ep-1"]
    assert episode.state is State.RETRY_WAIT and episode.attempts == 1
    assert episode.next_attempt_at >= episode.updated_at + 119


def test_a_busy_episode_423_waits_alone_while_others_ship(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    receiver.script = [
        httpx.Response(404),
        httpx.Response(423, headers={"Retry-After": "60"}, json={"error": "upload-in-flight"}),
    ]
    config = make_config(tmp_path, concurrency=1, retry={"base_seconds": 0.01, "max_seconds": 300})
    write_episode(config.spool_dir, "ep-1")
    write_episode(config.spool_dir, "ep-2")
    result = ship_once(config, receiver)
    assert result.episodes["ep-1"].state is State.RETRY_WAIT
    assert result.episodes["ep-2"].state is State.SHIPPED


def test_unsettled_and_unfinished_entries_are_not_shipped(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    config = make_config(tmp_path, settle_seconds=30.0)
    write_episode(config.spool_dir, "fresh")  # ctime is now: still being written
    (config.spool_dir / "no-meta" / "data").mkdir(parents=True)
    result = ship_once(config, receiver)
    assert result.episodes == {} and receiver.requests == []


def test_bad_meta_and_bad_ids_are_reported_not_shipped(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "no-commit", commit=None)
    write_episode(config.spool_dir, "bad id!")
    result = ship_once(config, receiver)
    assert "no code_version.commit" in str(result.episodes["no-commit"].last_error)
    assert "invalid episode id" in str(result.episodes["bad id!"].last_error)
    assert {e.state for e in result.episodes.values()} == {State.FATAL}
    assert receiver.requests == []


def test_retention_deletes_only_confirmed_shipped_copies(tmp_path: Path) -> None:
    receiver = FakeReceiver()
    config = make_config(tmp_path, retention={"delete_after_days": 0})
    write_episode(config.spool_dir, "ep-1")
    write_tarball(config.spool_dir, "ep-2")
    write_episode(config.spool_dir, "old-1", commit=OLD)
    result = ship_once(config, receiver)
    assert result.counts["shipped"] == 2
    assert sorted(p.name for p in config.spool_dir.iterdir()) == ["old-1"]
    assert list((config.state_dir / "packed").iterdir()) == []
    assert result.episodes["ep-1"].local_deleted_at is not None


def test_retention_keeps_shipped_copies_until_the_days_have_passed(tmp_path: Path) -> None:
    config = make_config(tmp_path, retention={"delete_after_days": 7})
    write_episode(config.spool_dir, "ep-1")
    assert ship_once(config, FakeReceiver()).counts["shipped"] == 1
    assert (config.spool_dir / "ep-1" / "meta.json").exists()
    # Our packed copy is derived data and goes at once; the directory stays.
    assert list((config.state_dir / "packed").iterdir()) == []


def test_uploads_run_concurrently_up_to_the_limit(tmp_path: Path) -> None:
    receiver = FakeReceiver()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return receiver.answer(request, {k.lower(): v for k, v in request.headers.items()})

    receiver.script = [slow] * 20
    config = make_config(tmp_path, concurrency=3)
    for n in range(10):
        write_episode(config.spool_dir, f"ep-{n}")
    assert ship_once(config, receiver).counts["shipped"] == 10
    assert receiver.max_in_flight == 3


def test_an_id_present_as_directory_and_tarball_is_shipped_once_and_reported(
    tmp_path: Path, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    write_episode(config.spool_dir, "ep-1")
    write_tarball(config.spool_dir, "ep-1")
    with caplog.at_level(logging.WARNING):
        result = ship_once(config, receiver)
    assert result.counts["shipped"] == 1 and len(receiver.puts()) == 1
    assert result.episodes["ep-1"].source == config.spool_dir / "ep-1"
    assert any("ep-1.tar.zst: ignored" in r.getMessage() for r in caplog.records)


def test_packed_copies_a_crash_orphaned_are_removed_at_start(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    packed = config.state_dir / "packed"
    packed.mkdir(parents=True)
    (packed / "ghost.tar.zst").write_bytes(b"renamed into place, never recorded")
    (packed / ".ghost.0a1b2c.tmp").write_bytes(b"half written")
    write_episode(config.spool_dir, "ep-1")
    assert ship_once(config, FakeReceiver()).counts["shipped"] == 1
    assert list(packed.iterdir()) == []


def test_an_unexpected_error_in_an_upload_is_retried_not_left_in_flight(tmp_path: Path) -> None:
    receiver = FakeReceiver()

    async def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in a transport")

    receiver.script = [broken]
    config = make_config(tmp_path, retry={"base_seconds": 60, "max_seconds": 60})
    write_episode(config.spool_dir, "ep-1")
    episode = ship_once(config, receiver).episodes["ep-1"]
    assert episode.state is State.RETRY_WAIT
    assert "bug in a transport" in str(episode.last_error)


def test_a_failed_upload_logs_what_happened_and_when_it_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def drop(request: httpx.Request) -> httpx.Response:
        await request.aread()
        raise httpx.RemoteProtocolError("Server disconnected", request=request)

    config = make_config(tmp_path, retry={"base_seconds": 30, "max_seconds": 30})
    write_episode(config.spool_dir, "ep-1")
    receiver = FakeReceiver(script=[httpx.Response(404), drop])
    with caplog.at_level(logging.WARNING, logger="shipper"):
        assert ship_once(config, receiver).counts["retry-wait"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "receiver unavailable" in r.getMessage()]
    assert line.startswith(
        "ep-1: receiver unavailable: connection closed by the receiver after the whole body"
    )
    assert re.search(r"1 consecutive failure\(s\), retry in \d+ s$", line), line


def test_an_episode_parked_for_a_commit_refused_earlier_keeps_its_commit(
    tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = make_config(tmp_path)
    queue = Queue.open(config.state_dir)
    queue.refuse_commit(OLD, "HTTP 412 stale-commit", REMEDIATION)
    queue.close()
    write_episode(config.spool_dir, "ep-1", OLD)
    episode = ship_once(config, receiver).episodes["ep-1"]
    assert episode.state is State.FATAL and episode.commit == OLD
    assert receiver.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_holds_every_episode_and_is_logged_at_error_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    refusal = httpx.Response(status, json={"error": "unauthorized", "detail": "unknown token"})
    receiver = FakeReceiver(script=[httpx.Response(404), refusal])
    config = make_config(tmp_path, token_file="token", retry={"base_seconds": 1, "max_seconds": 9})
    (tmp_path / "token").write_text("old-token\n")
    write_episode(config.spool_dir, "ep-1")
    write_episode(config.spool_dir, "ep-2")
    with caplog.at_level(logging.INFO, logger="shipper"):
        result = ship_once(config, receiver)
    # The other episode waits for the slow probe: the token is the host's, not the episode's.
    assert result.counts["retry-wait"] == 1 and result.counts["pending"] == 1
    assert result.counts["fatal"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"HTTP {status} unauthorized: unknown token" in errors[0]
    episode = result.episodes["ep-1"]
    assert str(episode.last_error).startswith("held: HTTP") and episode.attempts == 1
    assert episode.next_attempt_at - episode.updated_at == pytest.approx(9, abs=1)


def test_a_directory_that_changed_after_packing_is_kept_reported_and_shown(
    tmp_path: Path, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, retention={"delete_after_days": 1})
    source = write_episode(config.spool_dir, "ep-1", files={"a.bin": b"a", "b.bin": b"b"})
    write_episode(config.spool_dir, "ep-2")
    assert ship_once(config, receiver).counts["shipped"] == 2
    (source / "late.bin").write_bytes(b"written after the pause")
    (source / "b.bin").write_bytes(b"bb")
    config = make_config(tmp_path, retention={"delete_after_days": 0})
    with caplog.at_level(logging.WARNING, logger="shipper"):
        ship_once(config, receiver)
    assert (source / "late.bin").exists() and not (config.spool_dir / "ep-2").exists()
    (warning,) = [r.getMessage() for r in caplog.records if "after it was packed" in r.getMessage()]
    assert warning.startswith(f"ep-1: {source} changed after it was packed (b.bin, late.bin)")
    queue = Queue.open(config.state_dir)
    document = status_document(config, queue)
    queue.close()
    assert document["changed_after_packing"] == [
        {"episode_id": "ep-1", "source": str(source), "files": "b.bin, late.bin"}
    ]
    assert "changed after packing (kept, never deleted" in render_text(document)
