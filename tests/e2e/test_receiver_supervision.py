"""Workers end with their supervisor: a SIGKILLed main process leaves nothing serving."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.conftest import StartReceiver


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.add(int(entry.name))
    return members


def serving_pids(url: str, want: int, timeout: float = 10.0) -> set[int]:
    """The pids that answer /healthz, polled until `want` distinct ones have answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        seen.add(httpx.get(f"{url}/healthz", timeout=5).json()["pid"])
    return seen


def port_is_bindable(port: int) -> bool:
    # As uvicorn binds: SO_REUSEADDR passes TIME_WAIT, never a socket still listening.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_sigkill_of_the_main_process_ends_its_workers_and_frees_the_port(
    repo: Path, start_receiver: StartReceiver
) -> None:
    receiver = start_receiver(repo, server={"workers": 2})
    assert receiver.proc is not None
    main = receiver.proc.pid
    workers = serving_pids(receiver.url, want=2)
    assert len(workers) == 2 and main not in workers, workers
    assert workers <= group_members(main)
    assert not port_is_bindable(receiver.port)

    os.kill(main, signal.SIGKILL)  # the main process only, as the OOM killer would
    receiver.proc.wait()
    deadline = time.monotonic() + 5
    while group_members(main) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(main) == set(), "processes outlived the receiver's main process"
    assert port_is_bindable(receiver.port)
