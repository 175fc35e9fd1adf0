"""`make run`'s embedded default config starts a real receiver that answers /healthz."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from tests.support import dev_receiver, make_repo


def test_dev_config_starts_a_receiver_that_answers_healthz(tmp_path: Path) -> None:
    # The same command `make run` runs, in a fresh git checkout with no ./var yet.
    checkout = tmp_path / "checkout"
    make_repo(checkout, commits=2)
    log = tmp_path / "run.log"
    with dev_receiver(checkout, log) as (proc, url):
        body = httpx.get(f"{url}/healthz", timeout=5).json()
        assert body["status"] == "ok"
        assert (checkout / "var").is_dir()
        assert url in log.read_text()
        # The refusal names the checkout being served, not a placeholder.
        unknown = httpx.get(f"{url}/gate/{'0' * 40}", timeout=10)
        assert (unknown.status_code, unknown.json()["error"]) == (412, "unknown-commit")
        assert f"git -C {checkout.resolve()} " in unknown.json()["remediation"]
        assert "/path/to" not in unknown.json()["remediation"]
    assert proc.returncode == 0, log.read_text()


def test_makefile_run_target_uses_the_dev_config() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "episode-receiver serve --dev" in makefile
    assert shutil.which("make") is not None
