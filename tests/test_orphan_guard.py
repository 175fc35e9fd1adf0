"""tests/orphan_guard.py: a test server outlives no test run, even one killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.orphan_guard import OrphanGuard


def _sleeper(*, own_session: bool = False) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "import time; time.sleep(120)"]
    return subprocess.Popen(command, start_new_session=own_session)


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_owner_takes_its_server_group_and_directory_with_it(tmp_path: Path) -> None:
    owner, server = _sleeper(), _sleeper(own_session=True)
    home = tmp_path / "server-home"
    home.mkdir()
    OrphanGuard(group=server.pid, remove=home, owner=owner.pid)
    time.sleep(0.5)
    assert server.poll() is None  # the owner lives: the server is left alone
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    server.wait(10)
    assert server.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while home.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not home.exists()


def test_a_cancelled_guard_leaves_the_server_to_its_fixture(tmp_path: Path) -> None:
    owner, server = _sleeper(), _sleeper()
    guard = OrphanGuard(pid=server.pid, owner=owner.pid)
    guard.cancel()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(1.0)
    try:
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()
    assert _gone(server.pid)
