"""`make run`'s embedded default config starts a real receiver that answers /healthz."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import end_process_group, free_port, make_repo


def test_dev_config_starts_a_receiver_that_answers_healthz(tmp_path: Path) -> None:
    # The same command `make run` runs, in a fresh git checkout with no ./var yet.
    checkout = tmp_path / "checkout"
    make_repo(checkout, commits=2)
    port = free_port()
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve", "--dev", "--port", str(port)],
        cwd=checkout,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        body = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            try:
                response = httpx.get(f"{url}/healthz", timeout=1)
                if response.status_code == 200:
                    body = response.json()
            except httpx.HTTPError:
                time.sleep(0.1)
        assert body is not None, (tmp_path / "run.log").read_text()
        assert body["status"] == "ok"
        assert (checkout / "var").is_dir()
        assert url in (tmp_path / "run.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            end_process_group(proc)
            log.close()


def test_makefile_run_target_uses_the_dev_config() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "episode-receiver serve --dev" in makefile
    assert shutil.which("make") is not None
