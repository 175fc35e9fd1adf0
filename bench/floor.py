"""Run bench/floor_app.py under uvicorn on loopback: the small-upload figure's floor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench.client import HttpError, get
from tests.support import PROJECT_ROOT, end_process_group, free_port


class FloorServer:
    """`with FloorServer(data, workers) as floor: ... floor.port`; stopped by its PID."""

    def __init__(self, data: Path, workers: int) -> None:
        self.data = data
        self.workers = workers
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FloorServer:
        self.data.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(self.workers)]
        command += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        environment = {**os.environ, "FLOOR_DATA": str(self.data)}
        self._proc = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=environment, start_new_session=True
        )
        self._wait_listening(time.monotonic() + 30)
        return self

    def _wait_listening(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the floor app exited with {self._proc.returncode}")
            try:
                get(self.port, "/")  # 404: it answers
                return
            except (OSError, HttpError):
                time.sleep(0.05)
        raise RuntimeError(f"the floor app did not answer on port {self.port}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        end_process_group(self._proc)  # workers too, whatever the main process did
