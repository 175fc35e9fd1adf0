"""The README's 30-second tour, run as written (twice) against `make run`'s receiver.

Only the port and the scratch directory are substituted, so parallel runs do not meet.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import PROJECT_ROOT, dev_receiver, make_repo


def tour_commands() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("\n## A 30-second tour\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match is not None, "no sh block under 'A 30-second tour'"
    return match.group(1)


def localised(commands: str, url: str, scratch: Path) -> str:
    assert commands.count("http://127.0.0.1:8080/") == 2
    assert "/tmp/" in commands
    return commands.replace("http://127.0.0.1:8080", url).replace("/tmp/", f"{scratch}/")


def outputs(stdout: str) -> list[Any]:
    """What the tour prints, in order: JSON bodies (curl adds no newline) and plain lines."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    rest = stdout.lstrip()
    while rest:
        if rest.startswith("{"):
            value, end = decoder.raw_decode(rest)
            found.append(value)
            rest = rest[end:].lstrip()
        else:
            line, _, rest = rest.partition("\n")
            found.append(line.strip())
            rest = rest.lstrip()
    return found


def run_tour(script: str, checkout: Path) -> list[Any]:
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, "-euo", "pipefail", "-c", script],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return outputs(result.stdout)


def test_the_readme_tour_runs_as_written_and_again(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    make_repo(checkout, commits=2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with dev_receiver(checkout, tmp_path / "run.log") as (_proc, url):
        script = localised(tour_commands(), url, scratch)
        stored, row, listing, refused = run_tour(script, checkout)
        # A person reruns it later: at least in the next second, tar's mtime resolution.
        time.sleep(1.05 - time.time() % 1)
        retried, row_again, listing_again, refused_again = run_tour(script, checkout)

    assert stored["status"] == "stored" and stored["behind_by"] == 0, stored
    assert (row["host_id"], row["episode_id"], row["sha256"]) == (
        "lab-07",
        "ep-0001",
        stored["sha256"],
    )
    assert listing == "ep-0001.tar.zst"
    assert refused["error"] == "unknown-commit" and refused["remediation"], refused
    # The second run re-sends the same bytes: a retry, not a conflict.
    assert retried.get("status") == "already-present", retried
    assert retried["sha256"] == stored["sha256"]
    assert (row_again, listing_again, refused_again["error"]) == (row, listing, "unknown-commit")
    index = (checkout / "var" / "index.jsonl").read_text().splitlines()
    assert len(index) == 1
