"""`episode-shipper` commands: init, once exit codes, status, retry, one-line config errors."""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from shipper.cli import main
from shipper.config import load_config
from shipper.queue import Queue
from shipper.spool import Kind
from shipper.states import State
from tests.shipper.conftest import GOOD, OLD, REMEDIATION, write_episode
from tests.shipper.processes import ShipperProcess, wait_for
from tests.support import PROJECT_ROOT, free_port


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def write_config(tmp_path: Path, **overrides: object) -> Path:
    (tmp_path / "spool").mkdir(exist_ok=True)
    data: dict[str, object] = {
        "host_id": "lab-01",
        # Nobody listens on this port: connections are refused at once.
        "receiver_url": f"http://127.0.0.1:{free_port()}",
        "spool_dir": "spool",
        "state_dir": "state",
        "settle_seconds": 0,
    }
    data.update(overrides)
    path = tmp_path / "shipper.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_init_writes_a_config_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_cli(
        "init", "--host-id", "lab-07", "--receiver-url", "http://ingest:8080/",
        "--spool-dir", "spool", "--state-dir", "state", "--concurrency", "4",
        "--output", "conf/shipper.toml",
    )  # fmt: skip
    assert code == 0
    config = load_config(tmp_path / "conf" / "shipper.toml")
    assert (config.host_id, config.receiver_url, config.concurrency) == (
        "lab-07",
        "http://ingest:8080",
        4,
    )
    # Paths given relative to the shell's directory stay right wherever the file is.
    assert config.spool_dir == tmp_path / "spool" and config.state_dir == tmp_path / "state"


def test_init_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shipper.toml").write_text("# mine\n")
    code = run_cli(
        "init", "--host-id", "lab-07", "--receiver-url", "http://ingest:8080",
        "--spool-dir", "spool", "--state-dir", "state",
    )  # fmt: skip
    assert code == 2
    assert "refusing to overwrite" in one_error_line(capsys)
    assert (tmp_path / "shipper.toml").read_text() == "# mine\n"


def test_init_rejects_a_bad_host_id_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(
        "init", "--host-id", "../etc", "--receiver-url", "http://ingest:8080",
        "--spool-dir", "s", "--state-dir", "t", "--output", str(tmp_path / "x.toml"),
    )  # fmt: skip
    assert code == 2
    assert "host_id" in one_error_line(capsys)
    assert not (tmp_path / "x.toml").exists()


@pytest.mark.parametrize("command", ["run", "once", "status", "retry"])
def test_an_unknown_key_stops_every_command_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = write_config(tmp_path, concurency=3)
    assert run_cli(command, "--config", str(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "concurency" in line and "unknown key" in line


def test_a_missing_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("once", "--config", str(tmp_path / "nope.toml")) == 2
    assert "config file not found" in one_error_line(capsys)


def test_an_unreadable_token_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, token_file="missing-token")
    assert run_cli("once", "--config", str(path)) == 2
    assert "token_file" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_spool_dir_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, spool_dir="elsewhere")
    assert run_cli("run", "--config", str(path)) == 2
    assert "spool_dir" in capsys.readouterr().err.strip().splitlines()[-1]


def test_once_with_nothing_to_ship_exits_0(tmp_path: Path) -> None:
    assert run_cli("once", "--config", str(write_config(tmp_path))) == 0


def test_once_exits_1_while_the_receiver_is_unreachable_and_status_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    write_episode(tmp_path / "spool", "ep-1")
    assert run_cli("once", "--config", str(path)) == 1
    capsys.readouterr()
    assert run_cli("status", "--config", str(path)) == 0
    text = capsys.readouterr().out
    assert "1 retry-wait" in text and "ep-1" in text and "ConnectError" in text
    assert "receiver: unavailable" in text
    assert run_cli("status", "--config", str(path), "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["counts"]["retry-wait"] == 1
    (episode,) = document["episodes"]
    assert episode["attempts"] == 1 and episode["next_attempt_at"] is not None


def test_once_exits_3_with_a_fatal_episode_and_retry_requeues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    write_episode(tmp_path / "spool", "ep-1", commit=None)
    assert run_cli("once", "--config", str(path)) == 3
    capsys.readouterr()
    assert run_cli("retry", "--config", str(path)) == 0
    assert "re-queued 1 fatal episode" in capsys.readouterr().out
    queue = Queue.open(tmp_path / "state")
    episode = queue.get("ep-1")
    assert episode is not None and episode.state is State.PENDING
    queue.close()


def test_status_prints_the_remediation_verbatim_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    queue = Queue.open(tmp_path / "state")
    for episode_id in ("ep-1", "ep-2"):
        queue.add(episode_id, tmp_path / "spool" / episode_id, "dir")  # type: ignore[arg-type]
        queue.start_packing(episode_id)
        queue.set_commit(episode_id, OLD)
        queue.finish_packing(episode_id, tmp_path / "p", "f" * 64, 1)
    queue.refuse_commit(OLD, "HTTP 412 stale-commit", REMEDIATION)
    queue.close()
    assert run_cli("status", "--config", str(path)) == 0
    text = capsys.readouterr().out
    assert "2 fatal" in text and text.count(REMEDIATION) == 1
    assert "for ep-1, ep-2" in text


def test_status_before_the_first_run_shows_an_empty_queue_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert run_cli("status", "--config", str(path), "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["counts"].values()) == {0} and document["episodes"] == []
    assert not (tmp_path / "state").exists()


def test_a_second_shipper_on_the_same_state_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    with open(tmp_path / "state" / "shipper.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_cli("once", "--config", str(path)) == 2
    assert "in use by another shipper" in capsys.readouterr().err


def test_python_dash_m_shipper_is_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shipper", "--version"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("episode-shipper ")


def test_the_file_watchers_chatter_is_kept_out_of_the_daemons_log(tmp_path: Path) -> None:
    # watchfiles logs "N changes detected" at INFO for every batch of file events.
    shipper = ShipperProcess(write_config(tmp_path, rescan_seconds=60)).start()
    try:
        wait_for(lambda: "run: host lab-01" in shipper.log(), 10, "the daemon to start")
        producing = tmp_path / "spool" / "ep-1"
        producing.mkdir()
        for n in range(8):
            (producing / f"frame-{n}.bin").write_bytes(b"x" * 1000)
            time.sleep(0.1)
        time.sleep(0.6)  # watchfiles' debounce is 400 ms
    finally:
        assert shipper.stop() == 0
    assert "watching" not in shipper.log()  # the watcher ran (it did not fail)
    assert "changes detected" not in shipper.log() and "change detected" not in shipper.log()


def park(tmp_path: Path, episode_id: str, commit: str, reason: str = "HTTP 412") -> None:
    queue = Queue.open(tmp_path / "state")
    queue.add(episode_id, tmp_path / "spool" / episode_id, Kind.DIRECTORY)
    queue.start_packing(episode_id)
    queue.set_commit(episode_id, commit)
    queue.fatal(episode_id, reason)
    queue.refuse_commit(commit, reason, REMEDIATION)
    queue.close()


def states(tmp_path: Path) -> dict[str, State]:
    queue = Queue.open(tmp_path / "state")
    try:
        return {e.episode_id: e.state for e in queue.unshipped()}
    finally:
        queue.close()


def test_retry_with_ids_requeues_only_those_and_names_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    park(tmp_path, "ep-1", OLD)
    park(tmp_path, "ep-2", OLD)
    park(tmp_path, "ep-3", GOOD)
    assert run_cli("retry", "--config", str(path), "ep-1", "ep-9") == 1
    out, err = capsys.readouterr()
    assert "re-queued 1 fatal episode" in out and "ep-9: not re-queued (not in the queue)" in err
    assert states(tmp_path) == {"ep-1": State.PENDING, "ep-2": State.FATAL, "ep-3": State.FATAL}
    queue = Queue.open(tmp_path / "state")
    # ep-1's commit is asked again (else it would be parked at once); ep-3's stays refused.
    assert [r.commit for r in queue.refusals()] == [GOOD]
    queue.close()


def test_retry_with_a_commit_requeues_the_episodes_refused_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    park(tmp_path, "ep-1", OLD)
    park(tmp_path, "ep-2", OLD)
    park(tmp_path, "ep-3", GOOD)
    assert run_cli("retry", "--config", str(path), "--commit", OLD.upper()) == 0
    assert "re-queued 2 fatal episode" in capsys.readouterr().out
    assert states(tmp_path) == {"ep-1": State.PENDING, "ep-2": State.PENDING, "ep-3": State.FATAL}
    assert run_cli("retry", "--config", str(path), "--commit", "abc") == 2
    assert "--commit 'abc': must be 40 or 64 hex digits" in capsys.readouterr().err


def test_the_retry_hint_names_the_config_file_in_use(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_episode(tmp_path / "spool", "ep-1", commit=None)
    with caplog.at_level(logging.INFO, logger="shipper"):
        assert run_cli("once", "--config", "shipper.toml") == 3
    full = tmp_path.resolve() / "shipper.toml"
    assert f"episode-shipper retry --config {full} [ID...]" in caplog.text
    assert run_cli("status", "--config", "shipper.toml") == 0
    assert f"episode-shipper retry --config {full} [ID...]" in capsys.readouterr().out


def test_status_says_no_daemon_runs_and_counts_finished_entries_not_queued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, settle_seconds=0.5)
    write_episode(tmp_path / "spool", "ep-old")
    time.sleep(0.6)  # ep-old has settled (ctime counts, and only mtime can be backdated)
    (tmp_path / "spool" / "ep-new").mkdir()
    (tmp_path / "spool" / "ep-new" / "meta.json").write_text("{}")  # written just now
    assert run_cli("status", "--config", str(path)) == 0
    text = capsys.readouterr().out
    assert "daemon: not running" in text and f"run --config {path.resolve()}" in text
    assert "spool: 1 finished entry(ies) not queued yet, 1 still settling" in text
    assert "nothing waiting" not in text
    assert run_cli("status", "--config", str(path), "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["daemon"]["running"] is False
    assert document["spool"] == {"finished_not_queued": 1, "settling": 1}


def test_status_says_the_daemon_runs_with_its_pid_and_since_when(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    shipper = ShipperProcess(path).start()
    try:
        wait_for(lambda: "run: host lab-01" in shipper.log(), 10, "the daemon to start")
        assert run_cli("status", "--config", str(path), "--json") == 0
        daemon = json.loads(capsys.readouterr().out)["daemon"]
        assert run_cli("status", "--config", str(path)) == 0
        text = capsys.readouterr().out
    finally:
        assert shipper.stop() == 0
    assert shipper.proc is not None
    assert daemon["running"] is True and daemon["pid"] == shipper.proc.pid
    assert daemon["mode"] == "run" and daemon["since"] is not None
    assert f"daemon: running (run, pid {shipper.proc.pid}) since {daemon['since']}" in text
    assert "nothing waiting: every episode in the queue and the spool is shipped" in text
