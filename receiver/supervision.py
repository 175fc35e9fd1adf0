"""Tie each uvicorn worker's life to its supervisor's (the receiver's main process).

When the supervisor dies without stopping its workers (SIGKILL, the OOM killer), the
workers stop too, instead of serving on with no supervisor and holding the port. Linux
arms PR_SET_PDEATHSIG; everywhere a thread polls getppid(), and it ends a worker whose
graceful stop hangs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "EPISODE_RECEIVER_SUPERVISOR_PID"
POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Beyond uvicorn's graceful timeout: the lifespan waits up to 10 s for uploads to clean up.
_CLEANUP_SECONDS = 15.0


def mark_supervisor(workers: int) -> None:
    """In the main process, before uvicorn starts: tell workers whose death to follow."""
    if workers > 1:
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
    else:
        # A single process serves itself; an inherited value must not make it follow
        # whatever started it.
        os.environ.pop(SUPERVISOR_ENV, None)


def follow_supervisor(grace_seconds: float) -> None:
    """In a worker: stop (SIGTERM, a graceful stop) when the supervisor dies.

    A no-op in a process that is not a supervisor's worker.
    """
    value = os.environ.get(SUPERVISOR_ENV)
    if value is None or int(value) == os.getpid():
        return
    supervisor = int(value)
    _arm_parent_death_signal(signal.SIGTERM)
    # The supervisor may have died before the signal was armed: then nothing sends it.
    if os.getppid() != supervisor:
        log.error("supervisor %d died before worker %d started; exiting", supervisor, os.getpid())
        os._exit(1)
    deadline = grace_seconds + _CLEANUP_SECONDS
    threading.Thread(
        target=_watch, args=(supervisor, deadline), name="supervisor-watch", daemon=True
    ).start()


def _arm_parent_death_signal(signum: int) -> bool:
    """PR_SET_PDEATHSIG on Linux; False where it does not exist or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0
    except (OSError, AttributeError):
        return False
    if failed:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    return not failed


def _watch(supervisor: int, deadline_seconds: float) -> None:
    """Poll for the supervisor's death; SIGTERM this worker, then exit if it hangs."""
    while os.getppid() == supervisor:
        time.sleep(POLL_SECONDS)
    log.warning("supervisor %d is gone; worker %d stopping", supervisor, os.getpid())
    # With PDEATHSIG armed this SIGTERM is a second one, which uvicorn treats the same.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(deadline_seconds)
    log.error(
        "worker %d still running %.0f s after its supervisor died; exiting",
        os.getpid(),
        deadline_seconds,
    )
    os._exit(1)
