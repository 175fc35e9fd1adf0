"""Start-up checks shared by `serve` and `check-config`: data dir and gate repository."""

from __future__ import annotations

import subprocess

from episode_common.config_loading import ConfigError
from receiver.config import ReceiverConfig, ensure_data_dir


def check_gate_repo(config: ReceiverConfig) -> str | None:
    """None when the gate's repository and ref resolve; else one line saying why not."""
    gate = config.version_gate
    if not gate.enabled or gate.repo_path is None:
        return None
    where = f"{config.source}: version_gate.repo_path"
    if not gate.repo_path.is_dir():
        return f"{where}: {gate.repo_path} is not a directory"
    try:
        result = subprocess.run(
            [
                "git",
                "-C",
                str(gate.repo_path),
                "rev-parse",
                "--verify",
                "--quiet",
                f"{gate.ref}^{{commit}}",
            ],
            capture_output=True,
            timeout=gate.git_timeout_seconds,
            check=False,
        )
    except FileNotFoundError:
        return f"{where}: git is not installed"
    except subprocess.TimeoutExpired:
        return f"{where}: git did not answer within {gate.git_timeout_seconds:g} s"
    if result.returncode != 0:
        inside = subprocess.run(
            ["git", "-C", str(gate.repo_path), "rev-parse", "--git-dir"],
            capture_output=True,
            check=False,
        )
        if inside.returncode != 0:
            return f"{where}: {gate.repo_path} is not a git repository"
        return (
            f"{config.source}: version_gate.ref: {gate.ref!r} does not name a commit "
            f"in {gate.repo_path}"
        )
    return None


def check_all(config: ReceiverConfig) -> str | None:
    """Everything `check-config` promises, first problem first."""
    try:
        ensure_data_dir(config)
    except ConfigError as error:
        return str(error)
    return check_gate_repo(config)
