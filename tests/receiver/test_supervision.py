"""receiver.supervision: a worker stops when its supervisor dies, by either mechanism.

A stand-in supervisor (a plain Python process) starts one "worker" that calls
follow_supervisor, the way uvicorn's workers do in the app factory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.supervision import SUPERVISOR_ENV, mark_supervisor
from tests.support import PROJECT_ROOT, end_process_group

WORKER = """
import sys, time
from receiver import supervision
# Each mode disables the other mechanism, so each is shown to work on its own.
if sys.argv[1] == "watch-only":  # as on a platform without PR_SET_PDEATHSIG
    supervision._arm_parent_death_signal = lambda signum: False
else:
    supervision._watch = lambda supervisor, deadline_seconds: None
supervision.follow_supervisor(grace_seconds=1)
print("following", flush=True)
time.sleep(60)
"""

SUPERVISOR = f"""
import os, subprocess, sys, time
os.environ[{SUPERVISOR_ENV!r}] = str(os.getpid())
worker = subprocess.Popen([sys.executable, "-c", {WORKER!r}, sys.argv[1]])
print(worker.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("mode", ["pdeathsig", "watch-only"])
def test_the_worker_stops_when_its_supervisor_is_killed(mode: str) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, mode],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert supervisor.stdout is not None
        worker = int(supervisor.stdout.readline())
        assert supervisor.stdout.readline() == b"following\n"
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
        # PDEATHSIG is immediate; the watch polls every POLL_SECONDS (0.5).
        deadline = time.monotonic() + 3
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(worker)
    finally:
        end_process_group(supervisor)
        if supervisor.stdout is not None:
            supervisor.stdout.close()


def test_a_worker_whose_supervisor_died_before_it_started_exits_at_once() -> None:
    # The supervisor's pid is not our parent's: it died and we were re-parented.
    code = "from receiver import supervision; supervision.follow_supervisor(1); print('served')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env={**os.environ, SUPERVISOR_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "served" not in result.stdout


def test_only_a_multi_worker_main_process_names_itself_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SUPERVISOR_ENV, "12345")  # inherited from whatever started us
    mark_supervisor(workers=1)
    assert SUPERVISOR_ENV not in os.environ
    mark_supervisor(workers=2)
    assert os.environ[SUPERVISOR_ENV] == str(os.getpid())
