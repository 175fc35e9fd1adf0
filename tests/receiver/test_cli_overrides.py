"""`serve --host/--port/--workers` are checked exactly like the same values in a config file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from episode_common.config_loading import ConfigError
from receiver.config import load_config, with_server_overrides
from tests.support import PROJECT_ROOT, receiver_config, write_toml


def serve(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "receiver", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=cwd)


def one_line_refusal(result: subprocess.CompletedProcess[str], key: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    return lines[0]


def test_dev_with_a_public_host_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    line = one_line_refusal(serve("--dev", "--host", "0.0.0.0", cwd=tmp_path), "server.host")
    assert "--host" in line and "0.0.0.0" in line
    assert not (tmp_path / "var").exists()


def test_config_with_a_public_host_override_is_refused(tmp_path: Path, repo: Path) -> None:
    path = write_toml(tmp_path / "receiver.toml", receiver_config(tmp_path, repo))
    one_line_refusal(serve("--config", str(path), "--host", "0.0.0.0"), "server.host")
    assert not (tmp_path / "data").exists()


def test_port_override_is_validated_like_the_file_key(tmp_path: Path, repo: Path) -> None:
    path = write_toml(tmp_path / "receiver.toml", receiver_config(tmp_path, repo))
    one_line_refusal(serve("--config", str(path), "--port", "70000"), "server.port")


def test_workers_override_is_validated_like_the_file_key(tmp_path: Path, repo: Path) -> None:
    path = write_toml(tmp_path / "receiver.toml", receiver_config(tmp_path, repo))
    one_line_refusal(serve("--config", str(path), "--workers", "0"), "server.workers")


def test_overrides_pass_where_the_same_file_values_pass(tmp_path: Path, repo: Path) -> None:
    tokens = receiver_config(tmp_path, repo, auth={"mode": "tokens", "tokens_file": "t.toml"})
    config = load_config(write_toml(tmp_path / "receiver.toml", tokens))
    changed = with_server_overrides(config, {"host": "0.0.0.0", "port": 9001, "workers": 2})
    assert (changed.server.host, changed.server.port, changed.server.workers) == (
        "0.0.0.0",
        9001,
        2,
    )
    anonymous = load_config(write_toml(tmp_path / "anon.toml", receiver_config(tmp_path, repo)))
    with pytest.raises(ConfigError, match="allow_anonymous_remote"):
        with_server_overrides(anonymous, {"host": "192.0.2.1"})
    assert with_server_overrides(anonymous, {"host": "::1"}).server.host == "::1"
