"""A guard process that stops a test server if the test run itself dies (SIGKILL, OOM).

The fixtures stop their servers by PID at the end of the session; a pytest killed from
outside never gets there, and PostgreSQL, SeaweedFS or nginx would keep running. The
guard is a separate, tiny Python process in its own session: it waits for the owner (the
pytest process) to exit, then SIGKILLs the server (a PID or a whole process group) and
removes its directory. A fixture that stops its server normally kills the guard first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Run as `python -c GUARD owner pid group remove` ("-" for an unused argument).
GUARD = r"""
import os, select, shutil, signal, sys, time
owner, pid, group, remove = sys.argv[1:5]
try:
    fd = os.pidfd_open(int(owner))
    select.select([fd], [], [])  # readable once the owner has exited
except (AttributeError, OSError):
    while True:  # no pidfd here: poll
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
for kill, target in ((os.kill, pid), (os.killpg, group)):
    if target != "-":
        try:
            kill(int(target), signal.SIGKILL)
        except ProcessLookupError:
            pass
if remove != "-":
    time.sleep(1)  # let the server's children see it gone and exit
    shutil.rmtree(remove, ignore_errors=True)
"""


class OrphanGuard:
    """`guard = OrphanGuard(pid=..., remove=...)`; `guard.cancel()` when stopping normally."""

    def __init__(
        self,
        *,
        pid: int | None = None,
        group: int | None = None,
        remove: Path | None = None,
        owner: int | None = None,  # this process unless given
    ) -> None:
        owner = os.getpid() if owner is None else owner
        args = [str(owner), _arg(pid), _arg(group), "-" if remove is None else str(remove)]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", GUARD, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the test run's group leaves it to do its job
        )

    def cancel(self) -> None:
        """The server is being stopped by its fixture: the guard has nothing left to do."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()


def _arg(number: int | None) -> str:
    return "-" if number is None else str(number)
