"""The receiver's config layer: valid files, every kind of invalid one, one-line errors."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from episode_common.config_loading import ConfigError
from receiver.config import (
    DEFAULT_REMEDIATION,
    DEFAULT_REMEDIATION_UNKNOWN,
    GiB,
    ensure_data_dir,
    load_config,
)
from receiver.dev_config import dev_config
from shipper.config import load_config as load_shipper_config
from tests.support import PROJECT_ROOT, add_commit, git, give_to_another_user, head_commits

MINIMAL = '[storage]\ndata_dir = "data"\n[version_gate]\nrepo_path = "repo"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "receiver.toml"
    path.write_text(text)
    return path


def test_example_configs_load_with_every_key() -> None:
    receiver = load_config(PROJECT_ROOT / "etc" / "receiver.toml.example")
    assert receiver.storage.data_dir == Path("/var/lib/episode-ingest")
    assert receiver.version_gate.header == "X-Code-Commit"
    assert receiver.version_gate.remediation.startswith("# This host's code is too old")
    assert receiver.version_gate.remediation_unknown.startswith("# This host's commit is not on")
    shipper = load_shipper_config(PROJECT_ROOT / "etc" / "shipper.toml.example")
    assert shipper.host_id == "lab-07"
    assert shipper.receiver_url == "http://ingest.lab.example:8080"


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.storage.max_upload_bytes == 64 * GiB
    assert config.storage.validate == "tar"
    assert config.version_gate.window == 100
    assert config.auth.mode == "none"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.storage.data_dir == tmp_path.resolve() / "data"
    assert config.version_gate.repo_path == tmp_path.resolve() / "repo"


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (MINIMAL + "[server]\nprot = 1\n", "server.prot", "unknown key"),
        (MINIMAL + "colour = 1\n", "version_gate.colour", "unknown key"),
        ("source = 'x'\n" + MINIMAL, "source", "unknown key"),
        (MINIMAL + "[server]\nport = '80'\n", "server.port", "expected an integer, got a string"),
        (MINIMAL + "[server]\nport = 70000\n", "server.port", "expected an integer <= 65535"),
        (MINIMAL + "[server]\nport = 1.5\n", "server.port", "expected an integer, got a number"),
        ("[server]\nport = 1\n", "storage", "required key is missing"),
        ("[storage]\n", "storage.data_dir", "required key is missing"),
        (MINIMAL.replace('"repo"', "1"), "version_gate.repo_path", "expected a string"),
        (MINIMAL + "window = 0\n", "version_gate.window", "expected an integer >= 1"),
        (
            MINIMAL.replace('data_dir = "data"', 'data_dir = "d"\nvalidate = "full"'),
            "storage.validate",
            "expected one of",
        ),
        ('[storage]\ndata_dir = "d"\n', "version_gate.repo_path", "required when"),
        (MINIMAL + "[auth]\nmode = 'tokens'\n", "auth.tokens_file", "required when"),
        (
            MINIMAL + "refresh_seconds = 0\n",
            "version_gate.refresh_seconds",
            "expected a number > 0",
        ),
    ],
)
def test_invalid_configs_name_the_key_and_the_expectation(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_invalid_toml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 6"):
        load_config(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = write(tmp_path, "")
    binary.write_bytes(b"\xff\xfe[server]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = write(tmp_path, MINIMAL.replace('"data"', '"a-file/data"'))
    with pytest.raises(ConfigError, match=r"storage\.data_dir: cannot create"):
        ensure_data_dir(load_config(path))


def run_shell(text: str, code_dir: Path | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a remediation text as a lab host's shell would, with a stand-in episode-shipper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "episode-shipper"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path / "shipper-calls"}"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "EPISODE_CODE_DIR"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "GIT_CONFIG_GLOBAL": os.devnull}
    if code_dir is not None:
        env["EPISODE_CODE_DIR"] = str(code_dir)
    return subprocess.run(
        ["bash", "-c", text], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )


def shipper_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "shipper-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def lab_checkout(tmp_path: Path, origin: Path) -> Path:
    """A lab host's clone of the lab code, one commit behind the maintainer's branch."""
    clone = tmp_path / "lab-code"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    git(clone, "reset", "-q", "--hard", "HEAD~1")
    return clone


RETRY = "retry --config /etc/episode-ingest/shipper.toml"


def test_default_remediation_updates_the_lab_checkout_and_requeues(
    tmp_path: Path, repo: Path
) -> None:
    clone = lab_checkout(tmp_path, repo)
    behind = git(clone, "rev-parse", "HEAD")
    unset = run_shell(DEFAULT_REMEDIATION, None, tmp_path)
    assert unset.returncode != 0 and "set EPISODE_CODE_DIR" in unset.stderr
    assert git(clone, "rev-parse", "HEAD") == behind and shipper_calls(tmp_path) == []

    result = run_shell(DEFAULT_REMEDIATION, clone, tmp_path)
    assert result.returncode == 0, result.stderr
    assert git(clone, "rev-parse", "HEAD") == head_commits(repo, 1)[0]
    assert shipper_calls(tmp_path) == [RETRY]


def test_default_unknown_remediation_puts_the_host_back_on_the_tracked_branch(
    tmp_path: Path, repo: Path
) -> None:
    clone = lab_checkout(tmp_path, repo)
    git(clone, "checkout", "-q", "-b", "experiment")
    add_commit(clone, "never pushed")
    unset = run_shell(DEFAULT_REMEDIATION_UNKNOWN, None, tmp_path)
    assert unset.returncode != 0 and shipper_calls(tmp_path) == []
    assert git(clone, "rev-parse", "--abbrev-ref", "HEAD") == "experiment"

    result = run_shell(DEFAULT_REMEDIATION_UNKNOWN, clone, tmp_path)
    assert result.returncode == 0, result.stderr
    assert git(clone, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert git(clone, "rev-parse", "HEAD") == head_commits(repo, 1)[0]
    assert shipper_calls(tmp_path) == [RETRY]
    assert 'git -C "$EPISODE_CODE_DIR" push origin HEAD:main' in DEFAULT_REMEDIATION_UNKNOWN


def test_example_texts_are_the_defaults_for_the_example_labs_checkout() -> None:
    gate = load_config(PROJECT_ROOT / "etc" / "receiver.toml.example").version_gate
    code_dir = re.compile(r'"\$(\{EPISODE_CODE_DIR:\?[^}]*\}|EPISODE_CODE_DIR)"')
    assert gate.remediation == code_dir.sub("/opt/lab-code", DEFAULT_REMEDIATION)
    assert gate.remediation_unknown == code_dir.sub("/opt/lab-code", DEFAULT_REMEDIATION_UNKNOWN)
    for text in (gate.remediation, gate.remediation_unknown):
        assert "EPISODE_CODE_DIR" not in text and "/path/to" not in text


def test_dev_remediation_names_the_served_checkout_and_runs(tmp_path: Path, repo: Path) -> None:
    gate = dev_config(repo).version_gate
    head = head_commits(repo, 1)[0]
    for text in (gate.remediation, gate.remediation_unknown):
        assert f"git -C {repo} " in text
        assert "/path/to" not in text and "EPISODE_CODE_DIR" not in text
        result = run_shell(text, None, tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == head
    assert "last 50" in gate.remediation and "not in the history" in gate.remediation_unknown


def test_dev_config_points_at_the_checkout_and_var(tmp_path: Path) -> None:
    config = dev_config(tmp_path, port=9999)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 9999
    assert config.storage.data_dir == tmp_path / "var"
    assert config.version_gate.repo_path == tmp_path
    assert config.auth.mode == "none"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_check_config_names_dubious_ownership_and_the_command_that_fixes_it(
    tmp_path: Path, repo: Path
) -> None:
    checkout = (tmp_path / "lab checkout").resolve()
    shutil.copytree(repo, checkout)
    give_to_another_user(checkout)
    # No user config (a safe.directory = * there would hide the refusal); a system config of
    # our own, so the printed command can be run without touching /etc/gitconfig.
    system_config = tmp_path / "gitconfig-system"
    system_config.touch()
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": str(system_config)}
    # The premise: git itself refuses a checkout of another user, root included.
    direct = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--git-dir"], env=env, capture_output=True
    )
    assert direct.returncode == 128 and b"dubious ownership" in direct.stderr

    path = write(tmp_path, MINIMAL.replace('"repo"', f'"{checkout}"'))
    result = run_cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "is not a git repository" not in line
    assert f"fatal: detected dubious ownership in repository at '{checkout}'" in line
    fix = f"git config --system --add safe.directory '{checkout}'"
    assert line.endswith(fix)

    subprocess.run(shlex.split(fix), env=env, check=True)
    assert run_cli("check-config", "--config", str(path), env=env).returncode == 0


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[server]\nport = 'eighty'\n")
    for command in ("serve", "check-config"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "server.port" in lines[0] and str(path) in lines[0]
        assert "Traceback" not in result.stderr


def test_cli_serve_with_unwritable_data_dir_exits_2(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = write(tmp_path, MINIMAL.replace('"data"', '"a-file/data"'))
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "storage.data_dir" in result.stderr


def test_check_config_checks_the_gate_repository(tmp_path: Path, repo: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('"repo"', f'"{repo}"'))
    assert run_cli("check-config", "--config", str(path)).returncode == 0
    (tmp_path / "not-a-repo").mkdir()
    path = write(tmp_path, MINIMAL.replace('"repo"', '"not-a-repo"'))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "not a git repository" in result.stderr
    path = write(tmp_path, MINIMAL.replace('"repo"', f'"{repo}"') + 'ref = "no-such-branch"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "version_gate.ref" in result.stderr
