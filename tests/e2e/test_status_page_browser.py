"""The status page in a real headless Chromium, loaded from a live receiver that has stored
uploads from two hosts and refused a stale one from a third; assertions are on the text a
person sees. Chromium (Debian packages chromium, fonts-dejavu-core) is installed by `make
test` (scripts/setup-system.sh); without it this test fails, it does not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.status_page import human_bytes
from tests.conftest import StartReceiver
from tests.support import make_repo, make_tarball

# Flags for a root user in a container with no network but loopback: without the
# background-networking ones Chromium keeps trying to reach Google's hosts.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
)
_HIDDEN = {"head", "style", "script", "title", "template"}
_BLOCK = {"tr", "p", "div", "section", "header", "footer", "h1", "h2", "table", "br", "main"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "chromium is not installed; the status page is tested in a real browser. "
        "Install it with scripts/setup-system.sh (make test runs it)"
    )


def run_chromium(profile: Path, *args: str) -> str:
    profile.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, f"chromium exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


class VisibleText(HTMLParser):
    """The text a reader sees in a dumped DOM, and each table row's cells by table id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._hidden = 0
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self._hidden += 1
        if tag in _BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self._hidden -= 1
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        self.parts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        lines = ("".join(self.parts)).splitlines()
        return "\n".join(" ".join(line.split()) for line in lines if line.strip())


def read_page(dom: str) -> VisibleText:
    parser = VisibleText()
    parser.feed(dom)
    parser.close()
    return parser


def rows_by_first_cell(page: VisibleText, table: str) -> dict[str, list[str]]:
    body = page.tables[table][1:]  # the first row is the header a reader sees
    return {cells[0]: cells for cells in body if cells}


def put(url: str, host: str, episode: str, commit: str) -> httpx.Response:
    return httpx.put(
        f"{url}/episodes/{host}/{episode}",
        content=make_tarball(commit),
        headers={"X-Code-Commit": commit},
        timeout=30,
    )


def test_status_page_shows_hosts_stale_mark_and_rejections(
    tmp_path: Path, start_receiver: StartReceiver
) -> None:
    repo = tmp_path / "repo"
    newest, middle, oldest = make_repo(repo, commits=3)
    receiver = start_receiver(repo, version_gate={"window": 2})
    url = receiver.url

    stored: dict[str, int] = {"lab-01": 0, "lab-02": 0}
    for host, episode, commit in [
        ("lab-01", "ep-0001", newest),
        ("lab-01", "ep-0002", newest),
        ("lab-01", "ep-0003", newest),
        ("lab-02", "ep-0001", middle),
    ]:
        response = put(url, host, episode, commit)
        assert response.status_code == 201, response.text
        stored[host] += response.json()["size_bytes"]
    refused = put(url, "lab-03", "ep-0042", oldest)
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"] == "stale-commit"
    # The shipper asks HEAD first, so a refusal to HEAD must mark the host too.
    unknown = httpx.head(
        f"{url}/episodes/lab-04/ep-0007", headers={"X-Code-Commit": "e" * 40}, timeout=30
    )
    assert unknown.status_code == 412

    response = httpx.get(f"{url}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")

    page = read_page(run_chromium(tmp_path / "profile-dom", "--dump-dom", f"{url}/"))
    flat = " ".join(page.text.split())

    # The gate: head commit (short) and how fresh the window is; no trouble banner.
    assert f"Gate head (HEAD) {newest[:10]}" in flat, flat
    assert re.search(r"Last good refresh (just now|\d+ s ago)", flat), flat
    assert "Window (commits) 2 of 2" in flat, flat
    assert "Hosts 4 Episodes 4" in flat and "Stale hosts 2" in flat, flat
    assert "refresh failed" not in flat and "never loaded" not in flat, flat

    assert page.tables["hosts"][0] == [
        "Host", "Status", "Episodes", "Bytes", "Last episode", "Last commit", "Behind head",
    ]  # fmt: skip
    hosts = rows_by_first_cell(page, "hosts")
    assert list(hosts) == ["lab-01", "lab-02", "lab-03", "lab-04"], hosts
    recent = r"(just now|\d+ s ago) \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"

    status, episodes, size, seen, commit, behind = hosts["lab-01"][1:]
    assert (status, episodes, size) == ("OK", "3", human_bytes(stored["lab-01"]))
    assert re.fullmatch(recent, seen), seen
    assert (commit, behind) == (newest[:10], "at head")

    status, episodes, size, seen, commit, behind = hosts["lab-02"][1:]
    assert (status, episodes, size) == ("OK", "1", human_bytes(stored["lab-02"]))
    assert re.fullmatch(recent, seen), seen
    assert (commit, behind) == (middle[:10], "1 behind")

    status, episodes, size, seen, commit, behind = hosts["lab-03"][1:]
    assert re.fullmatch(
        rf"STALE stale-commit (just now|\d+ s ago), 2 behind · {oldest[:10]}", status
    ), status
    assert (episodes, size, seen, commit, behind) == ("0", "0 B", "never", "", "")

    status = hosts["lab-04"][1]
    assert re.fullmatch(r"STALE unknown-commit (just now|\d+ s ago) · eeeeeeeeee", status), status

    assert page.tables["rejections"][0] == ["When", "Host", "Episode", "Reason", "Commit"]
    rejections = page.tables["rejections"][1:]
    assert [row[1:] for row in rejections] == [
        ["lab-04", "ep-0007", "unknown-commit HEAD 412", "eeeeeeeeee"],
        ["lab-03", "ep-0042", "stale-commit PUT 412", f"{oldest[:10]} 2 behind"],
    ], rejections
    assert all(re.fullmatch(recent, row[0]) for row in rejections), rejections

    # A person sees the same thing: keep a screenshot for a human (and CI artefacts) to read.
    shot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT", tmp_path / "status.png"))
    run_chromium(
        tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,900", f"{url}/"
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # /metrics tells the same story to Prometheus.
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    assert found[("episode_ingest_uploads_total", (("outcome", "stored"),))] == 4
    stale_key = (("host", "lab-03"), ("reason", "stale-commit"))
    assert found[("episode_ingest_rejections_total", stale_key)] == 1
    assert found[("episode_ingest_gate_loaded", ())] == 1
    assert found[("episode_ingest_gate_window_size", ())] == 2
    assert found[("episode_ingest_index_rows", ())] == 4
    assert found[("episode_ingest_upload_bytes_total", ())] == sum(stored.values())
