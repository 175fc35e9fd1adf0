"""receiver.auth and add-host/remove-host: minting, hashing, checking, hot reload."""

from __future__ import annotations

import base64
import logging
import multiprocessing
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from episode_common.config_loading import ConfigError
from receiver.auth import REALM_HEADER, TokenStore, add_host, read_tokens, remove_host
from receiver.cli import main
from receiver.errors import Forbidden, Unauthorized
from tests.support import PROJECT_ROOT, receiver_config, write_toml


class FakeClock:
    """Monotonic time the test moves by hand, so reload checks need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.5) -> None:
        self.now += seconds


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.toml"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def started_store(path: Path, clock: FakeClock) -> TokenStore:
    store = TokenStore(path, clock=clock)
    store.load()
    return store


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_minted_token_is_stored_only_as_its_hash_in_a_0600_file(tokens_file: Path) -> None:
    token = add_host(tokens_file, "lab-07")
    text = tokens_file.read_text()
    assert token not in text
    assert token[:16] not in text
    hosts = read_tokens(tokens_file)
    assert list(hosts) == ["lab-07"]
    assert len(hosts["lab-07"].sha256) == 64
    assert hosts["lab-07"].created_at.endswith("+00:00")
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600


def test_token_carries_at_least_256_bits_of_randomness(tokens_file: Path) -> None:
    token = add_host(tokens_file, "lab-07")
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(decoded) >= 32
    assert add_host(tokens_file, "lab-08") != token


def test_own_token_is_authorized(tokens_file: Path, clock: FakeClock) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    store.authorize("lab-07", bearer(token))
    store.authorize("lab-07", f"bearer   {token}  ")  # the scheme is case-insensitive


def test_wrong_token_is_401_with_the_bearer_challenge(tokens_file: Path, clock: FakeClock) -> None:
    add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    with pytest.raises(Unauthorized) as caught:
        store.authorize("lab-07", bearer("not-the-token"))
    assert caught.value.status_code == 401
    assert caught.value.headers == REALM_HEADER


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   "])
def test_missing_header_or_token_is_401(
    tokens_file: Path, clock: FakeClock, header: str | None
) -> None:
    add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    with pytest.raises(Unauthorized) as caught:
        store.authorize("lab-07", header)
    assert caught.value.headers == REALM_HEADER


def test_basic_scheme_is_401_even_with_the_right_secret(
    tokens_file: Path, clock: FakeClock
) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", f"Basic {token}")


def test_token_of_another_host_is_403(tokens_file: Path, clock: FakeClock) -> None:
    add_host(tokens_file, "lab-07")
    other = add_host(tokens_file, "lab-08")
    store = started_store(tokens_file, clock)
    with pytest.raises(Forbidden) as caught:
        store.authorize("lab-07", bearer(other))
    assert caught.value.status_code == 403


def test_authorize_any_accepts_every_host_token_and_nothing_else(
    tokens_file: Path, clock: FakeClock
) -> None:
    tokens = [add_host(tokens_file, host) for host in ("lab-07", "lab-08")]
    store = started_store(tokens_file, clock)
    for token in tokens:
        store.authorize_any(bearer(token))
    with pytest.raises(Unauthorized):
        store.authorize_any(bearer("guess"))
    with pytest.raises(Unauthorized):
        store.authorize_any(None)


def test_tokens_never_appear_in_logs_or_error_bodies(
    tokens_file: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = add_host(tokens_file, "lab-07")
    other = add_host(tokens_file, "lab-08")
    store = started_store(tokens_file, clock)
    bodies = []
    for host, header in [("lab-07", bearer(other)), ("lab-07", bearer(token + "x"))]:
        with pytest.raises((Unauthorized, Forbidden)) as caught:
            store.authorize(host, header)
        bodies.append(str(caught.value.body()) + str(caught.value))
    for secret in (token, other):
        assert secret not in caplog.text
        assert all(secret not in body for body in bodies)


def test_missing_tokens_file_means_no_host_may_upload(tokens_file: Path, clock: FakeClock) -> None:
    store = started_store(tokens_file, clock)
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer("anything"))


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        '[hosts.lab-07]\nsha256 = "abc"\ncreated_at = "2026-11-23T18:00:00+00:00"\n',
        '[hosts.lab-07]\nsha256 = "' + "a" * 64 + '"\n',
        '[hosts.lab-07]\nsha256 = "' + "a" * 64 + '"\ncreated_at = "x"\ntoken = "y"\n',
        "hosts = 1\n",
        '[hosts."../x"]\nsha256 = "' + "a" * 64 + '"\ncreated_at = "x"\n',
        '[hosts.a]\nsha256 = "' + "a" * 64 + '"\ncreated_at = "x"\n'
        '[hosts.b]\nsha256 = "' + "A" * 64 + '"\ncreated_at = "x"\n',
    ],
)
def test_corrupt_tokens_file_at_load_is_a_config_error(
    tokens_file: Path, clock: FakeClock, text: str
) -> None:
    tokens_file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        TokenStore(tokens_file, clock=clock).load()
    assert caught.value.source == str(tokens_file)


def test_removed_host_is_401_after_the_next_check(tokens_file: Path, clock: FakeClock) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    store.authorize("lab-07", bearer(token))
    assert remove_host(tokens_file, "lab-07") is True
    clock.advance()
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(token))


def test_host_added_after_start_is_accepted_without_restart(
    tokens_file: Path, clock: FakeClock
) -> None:
    first = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    store.authorize("lab-07", bearer(first))
    token = add_host(tokens_file, "lab-08")
    clock.advance()
    store.authorize("lab-08", bearer(token))


def test_the_file_is_checked_at_most_once_per_interval(tokens_file: Path, clock: FakeClock) -> None:
    store = started_store(tokens_file, clock)
    token = add_host(tokens_file, "lab-07")
    clock.advance(0.5)
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(token))
    clock.advance(0.6)
    store.authorize("lab-07", bearer(token))


def test_real_clock_picks_up_a_new_host_within_the_interval(tokens_file: Path) -> None:
    store = TokenStore(tokens_file, check_interval=0.05)
    store.load()
    token = add_host(tokens_file, "lab-07")
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(token))  # first check happens 0.05 s after load
    time.sleep(0.06)
    store.authorize("lab-07", bearer(token))


def test_corrupt_file_after_start_keeps_the_last_good_set_and_logs_one_error(
    tokens_file: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    tokens_file.write_text("[hosts.lab-07\n")
    for _ in range(3):
        clock.advance()
        store.authorize("lab-07", bearer(token))
    errors = [r for r in caplog.records if r.name == "receiver.auth" and r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "keeping the last good set of 1 hosts" in errors[0].getMessage()
    tokens_file.unlink()  # repaired by rewriting it through the tool
    newer = add_host(tokens_file, "lab-08")
    clock.advance()
    store.authorize("lab-08", bearer(newer))
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(token))


def test_zero_byte_file_after_start_keeps_the_last_good_set(
    tokens_file: Path, clock: FakeClock
) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    tokens_file.write_bytes(b"")  # what a non-atomic writer leaves for a moment
    clock.advance()
    store.authorize("lab-07", bearer(token))


def test_removing_the_last_host_revokes_it(tokens_file: Path, clock: FakeClock) -> None:
    token = add_host(tokens_file, "lab-07")
    store = started_store(tokens_file, clock)
    remove_host(tokens_file, "lab-07")
    clock.advance()
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(token))
    assert read_tokens(tokens_file) == {}


def test_add_host_refuses_an_existing_host_unless_rotating(
    tokens_file: Path, clock: FakeClock
) -> None:
    old = add_host(tokens_file, "lab-07")
    with pytest.raises(ValueError, match="already has a token"):
        add_host(tokens_file, "lab-07")
    new = add_host(tokens_file, "lab-07", rotate=True)
    store = started_store(tokens_file, clock)
    store.authorize("lab-07", bearer(new))
    with pytest.raises(Unauthorized):
        store.authorize("lab-07", bearer(old))


def test_add_host_refuses_to_overwrite_a_corrupt_file(tokens_file: Path) -> None:
    tokens_file.write_text("[hosts.lab-07\n")
    with pytest.raises(ConfigError):
        add_host(tokens_file, "lab-08")
    assert tokens_file.read_text() == "[hosts.lab-07\n"


def test_add_host_refuses_an_invalid_host_id(tokens_file: Path) -> None:
    with pytest.raises(ValueError, match="must match"):
        add_host(tokens_file, "../etc")
    assert not tokens_file.exists()


def test_remove_host_of_an_unknown_host_returns_false_and_writes_nothing(
    tokens_file: Path,
) -> None:
    add_host(tokens_file, "lab-07")
    before = tokens_file.stat()
    assert remove_host(tokens_file, "lab-99") is False
    after = tokens_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def mint_many(path: str, prefix: str, count: int, start: Any) -> None:
    """In a spawned process: wait for the others, then add `count` hosts."""
    start.wait()
    for number in range(count):
        add_host(Path(path), f"{prefix}-{number}")


def test_concurrent_add_host_from_several_processes_keeps_every_entry(
    tokens_file: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(target=mint_many, args=(str(tokens_file), f"lab{n}", 8, start))
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    expected = {f"lab{n}-{i}" for n in range(4) for i in range(8)}
    assert set(read_tokens(tokens_file)) == expected


def write_config(tmp_path: Path, **auth: Any) -> Path:
    config = receiver_config(tmp_path, None, auth=auth)
    return write_toml(tmp_path / "receiver.toml", config)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_cli_add_host_prints_exactly_one_line_on_stdout_and_it_authorizes(
    tmp_path: Path, tokens_file: Path, clock: FakeClock
) -> None:
    config = write_config(tmp_path, mode="tokens", tokens_file=str(tokens_file))
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "add-host", "lab-07", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert result.stdout == lines[0] + "\n"
    assert "token_file" in result.stderr
    assert lines[0] not in result.stderr
    started_store(tokens_file, clock).authorize("lab-07", bearer(lines[0]))


def test_cli_add_host_rotate_replaces_the_token(
    tmp_path: Path, tokens_file: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, mode="tokens", tokens_file=str(tokens_file)))
    assert run_cli(capsys, "add-host", "lab-07", "--config", config)[0] == 0
    code, out, err = run_cli(capsys, "add-host", "lab-07", "--config", config)
    assert (code, out) == (1, "")
    assert "--rotate" in err
    code, out, _ = run_cli(capsys, "add-host", "lab-07", "--config", config, "--rotate")
    assert code == 0
    started_store(tokens_file, clock).authorize("lab-07", bearer(out.strip()))


def test_cli_add_host_with_auth_mode_none_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, mode="none")
    code, out, err = run_cli(capsys, "add-host", "lab-07", "--config", str(config))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert 'auth.mode = "tokens"' in err


def test_cli_add_host_with_an_invalid_host_exits_2(
    tmp_path: Path, tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, mode="tokens", tokens_file=str(tokens_file))
    code, out, err = run_cli(capsys, "add-host", "lab/07", "--config", str(config))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert not tokens_file.exists()


def test_cli_remove_host_revokes_and_exits_0(
    tmp_path: Path, tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_host(tokens_file, "lab-07")
    config = write_config(tmp_path, mode="tokens", tokens_file=str(tokens_file))
    code, _, _ = run_cli(capsys, "remove-host", "lab-07", "--config", str(config))
    assert code == 0
    assert read_tokens(tokens_file) == {}


def test_cli_remove_host_of_an_unknown_host_exits_1(
    tmp_path: Path, tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_host(tokens_file, "lab-07")
    config = write_config(tmp_path, mode="tokens", tokens_file=str(tokens_file))
    code, out, err = run_cli(capsys, "remove-host", "lab-99", "--config", str(config))
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "lab-99" in err
    assert list(read_tokens(tokens_file)) == ["lab-07"]
