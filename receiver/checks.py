"""Start-up checks shared by `serve` and `check-config`: data dir, blob store, gate repository."""

from __future__ import annotations

import os
import subprocess

from episode_common.config_loading import ConfigError
from receiver.config import PostgresIndexConfig, ReceiverConfig, S3StorageConfig, ensure_data_dir
from receiver.git_errors import describe


def _git_env() -> dict[str, str]:
    # English messages, as the gate gets: the fix for "dubious ownership" is found by its text.
    return {**os.environ, "LC_ALL": "C"}


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
            env=_git_env(),
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
            env=_git_env(),
        )
        if inside.returncode != 0:
            # git's own reason: "not a git repository", "dubious ownership", a broken .git...
            reason = describe(inside.stderr.decode(errors="replace"))
            return f"{where}: {gate.repo_path}: {reason}"
        return (
            f"{config.source}: version_gate.ref: {gate.ref!r} does not name a commit "
            f"in {gate.repo_path}"
        )
    return None


def check_catalogue(config: ReceiverConfig) -> str | None:
    """A database catalogue answers and its schema is this receiver's (nothing is changed)."""
    if not isinstance(config.index, PostgresIndexConfig):
        return None
    from receiver.storage import BackendUnavailable, CatalogueCorrupt, open_storage

    catalogue = open_storage(config).catalogue
    try:
        catalogue.recover(repair=False)
    except (BackendUnavailable, CatalogueCorrupt, OSError) as error:
        return f"{config.source}: index.dsn: {error}"
    finally:
        catalogue.close()
    return None


def check_storage(config: ReceiverConfig) -> tuple[str, bool] | None:
    """None when the blob store can be used; else (one line naming the key, whether a
    later retry may succeed). Only the s3 store has a server to ask."""
    if not isinstance(config.storage, S3StorageConfig):
        return None
    from receiver.storage.s3_client import probe  # boto3 is imported only when used

    problem = probe(config.storage)
    return None if problem is None else (f"{config.source}: {problem[0]}", problem[1])


def check_all(config: ReceiverConfig) -> str | None:
    """Everything `check-config` promises, first problem first."""
    try:
        ensure_data_dir(config)
    except ConfigError as error:
        return str(error)
    storage = check_storage(config)
    if storage is not None:
        return storage[0]
    return check_gate_repo(config) or check_catalogue(config)
