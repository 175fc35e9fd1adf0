"""scripts/setup-system.sh: what `make test` runs first to install missing system packages.

The real install is what CI exercises (.ci/run in a fresh clone). Here the script runs
against a PATH of stand-ins: an `apt-get` that records its calls and an `id` that claims
root or not, so each branch is checked without touching the machine's packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "setup-system.sh"


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def bare_path(tmp_path: Path, uid: int) -> tuple[Path, Path]:
    """A PATH with only a shell, a recording apt-get and an `id` that answers `uid`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "chmod", "rm"):
        real = shutil.which(tool)
        assert real is not None
        (bin_dir / tool).symlink_to(real)
    calls = tmp_path / "apt-calls"
    stand_in(bin_dir, "apt-get", f'echo "$*" >> {calls}')
    stand_in(bin_dir, "id", f"echo {uid}")
    return bin_dir, calls


def run(script_args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    # Where the script puts its "start no service" policy: beside the stand-ins, not /usr/sbin.
    policy = Path(path.split(":")[0]).parent / "policy-rc.d"
    env = {"PATH": path, "PYTHON": "no-such-python", "SETUP_POLICY_RC_D": str(policy)}
    return subprocess.run(
        [bash, str(SCRIPT), *script_args], env=env, capture_output=True, text=True, timeout=30
    )


def test_check_mode_names_every_missing_package_and_installs_nothing(tmp_path: Path) -> None:
    bin_dir, calls = bare_path(tmp_path, uid=0)
    result = run(["--check"], str(bin_dir))
    assert result.returncode == 1
    named = set(result.stderr.split(": ")[-1].split())
    assert {"git", "make", "curl", "zstd", "python3", "python3-venv", "chromium", "wrk"} <= named
    assert not calls.exists()


def test_as_root_it_updates_then_installs_what_is_missing(tmp_path: Path) -> None:
    bin_dir, calls = bare_path(tmp_path, uid=0)
    result = run([], str(bin_dir))
    lines = calls.read_text().splitlines()
    assert lines[0] == "update -qq"
    assert lines[1].startswith("install -y -qq ") and "chromium" in lines[1].split()
    # The stand-in installed nothing, and the script says so instead of passing.
    assert result.returncode == 1
    assert "still missing after apt-get install" in result.stderr


def test_no_service_starts_while_it_installs_and_the_policy_is_removed_after(
    tmp_path: Path,
) -> None:
    bin_dir, calls = bare_path(tmp_path, uid=0)
    policy = tmp_path / "policy-rc.d"
    # apt-get runs a package's service start through invoke-rc.d, which asks policy-rc.d.
    stand_in(
        bin_dir, "apt-get", f'echo "$*" >> {calls}; {policy} start; echo "policy $?" >> {calls}'
    )
    run([], str(bin_dir))
    assert "policy 101" in calls.read_text().splitlines()  # 101: action forbidden
    assert not policy.exists()


def test_without_root_or_sudo_it_prints_one_command_and_fails(tmp_path: Path) -> None:
    bin_dir, calls = bare_path(tmp_path, uid=1000)
    stand_in(bin_dir, "sudo", "exit 1")  # sudo that needs a password: `sudo -n` fails
    result = run([], str(bin_dir))
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    command = line.split("run: ", 1)[1]
    assert command.startswith("sudo apt-get update && sudo apt-get install -y ")
    assert "chromium" in command.split()
    assert not calls.exists()


def test_without_root_it_installs_through_sudo_n(tmp_path: Path) -> None:
    bin_dir, calls = bare_path(tmp_path, uid=1000)
    stand_in(bin_dir, "sudo", f'[ "$2" = true ] && exit 0; echo "sudo $*" >> {calls}')
    run([], str(bin_dir))
    lines = calls.read_text().splitlines()
    prefix = "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get"
    assert lines[0] == f"{prefix} update -qq"
    assert lines[1].startswith(f"{prefix} install -y -qq ")


def test_nothing_runs_apt_get_when_everything_is_present(tmp_path: Path) -> None:
    # This machine ran the script (make test's first step), so all probes pass here.
    bin_dir, calls = bare_path(tmp_path, uid=0)
    (bin_dir / "bash").unlink()
    (bin_dir / "sh").unlink()
    (bin_dir / "id").unlink()
    env_path = f"{bin_dir}:{os.environ['PATH']}"
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, str(SCRIPT)],
        env={**os.environ, "PATH": env_path},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert not calls.exists()


def test_make_test_runs_the_script_first_and_make_run_does_not() -> None:
    # Run from make test itself, an inherited MAKEFLAGS would add "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}

    def dry(target: str) -> list[str]:
        result = subprocess.run(
            ["make", "--no-print-directory", "-n", "-B", target],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    assert "scripts/setup-system.sh" in dry("test")[0]
    assert not any("setup-system" in line for line in dry("run"))
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "scripts/setup-system.sh" in ci and "apt-get" not in ci
