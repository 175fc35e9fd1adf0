"""Telemetry counters, rejection ring buffer, stale marks, /metrics text and the status page."""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.events import RequestEvent
from receiver.status_commits import MAX_COMMITS
from receiver.status_page import human_age, human_bytes, render_status_page
from receiver.storage import CommitSummary
from receiver.storage.memory import MemoryCatalogue
from receiver.storage.rows import IndexRow, summarise_hosts
from receiver.telemetry import Telemetry, host_label

NOW = 1_800_000_000.0
OLD = "a" * 40
HEAD = "f" * 40
GATE: dict[str, object] = {
    "enabled": True,
    "loaded": True,
    "ref": "main",
    "window": 5,
    "head_commit": HEAD,
    "window_size": 5,
    "last_refresh_age_seconds": 2.5,
    "last_error": None,
    "refresh_failures": 1,
    "refreshes": 7,
}


def event(
    outcome: str,
    status: int,
    *,
    host: str = "lab-01",
    episode: str = "ep-1",
    method: str = "PUT",
    size: int = 0,
    duration: float = 0.5,
    commit: str | None = HEAD,
    behind_by: int | None = 0,
    at: float = NOW,
) -> RequestEvent:
    return RequestEvent(
        method=method,
        host_id=host,
        episode_id=episode,
        status=status,
        outcome=outcome,
        size_bytes=size,
        duration_seconds=duration,
        commit=commit,
        behind_by=behind_by,
        finished_at=at,
    )


def samples(telemetry: Telemetry, gate: dict[str, object] = GATE) -> dict[str, float]:
    """Every sample of the exposition as 'name{k="v",...}' -> value."""
    body, _ = telemetry.render_metrics(gate)
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def row(host: str, episode: str, size: int, at: str, commit: str | None = HEAD) -> IndexRow:
    return IndexRow(
        commit=commit,
        episode_id=episode,
        host_id=host,
        received_at_wall=at,
        schema_version=1,
        sha256="0" * 64,
        size_bytes=size,
    )


def visible_text(page: str) -> str:
    """What a reader sees, roughly: no <style>, no tags, entities decoded, spaces squeezed."""
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def page(
    telemetry: Telemetry,
    rows: Iterable[IndexRow] = (),
    gate: dict[str, object] = GATE,
) -> str:
    positions = {HEAD: 0, "b" * 40: 4}
    return render_status_page(
        hosts=summarise_hosts(rows),
        gate_state=gate,
        gate_positions=positions.get,
        telemetry=telemetry,
        now=NOW,
        version="9.9.9",
    )


# -- counters and metrics ----------------------------------------------------------------


def test_metrics_count_uploads_bytes_durations_and_rejections() -> None:
    telemetry = Telemetry()
    telemetry.request_finished(event("stored", 201, size=1000, duration=0.2))
    telemetry.request_finished(event("stored", 201, size=24, duration=40.0))
    telemetry.request_finished(event("already-present", 200, size=1000, duration=0.01))
    telemetry.request_finished(event("stale-commit", 412, host="lab-03", commit=OLD, behind_by=9))
    telemetry.request_finished(event("stale-commit", 412, host="lab-03", method="HEAD"))
    telemetry.request_finished(event("not-found", 404, method="HEAD"))  # not a rejection
    telemetry.set_gauges(free_bytes=123456, index_rows=42)

    found = samples(telemetry)

    assert found['episode_ingest_uploads_total{outcome="stored"}'] == 2
    assert found['episode_ingest_uploads_total{outcome="already-present"}'] == 1
    assert found['episode_ingest_uploads_total{outcome="stale-commit"}'] == 1  # PUTs only
    assert found["episode_ingest_upload_bytes_total"] == 1024  # newly stored bytes only
    assert found["episode_ingest_upload_duration_seconds_count"] == 4
    assert found['episode_ingest_upload_duration_seconds_bucket{le="0.25"}'] == 2
    assert found['episode_ingest_upload_duration_seconds_bucket{le="60.0"}'] == 4
    assert found['episode_ingest_rejections_total{host="lab-03",reason="stale-commit"}'] == 2
    assert not any("not-found" in key for key in found)
    assert found["episode_ingest_gate_refreshes_total"] == 7
    assert found["episode_ingest_gate_refresh_failures_total"] == 1
    assert found["episode_ingest_gate_window_size"] == 5
    assert found["episode_ingest_gate_loaded"] == 1
    assert found["episode_ingest_gate_last_refresh_age_seconds"] == 2.5
    assert found["episode_ingest_free_disk_bytes"] == 123456
    assert found["episode_ingest_index_rows"] == 42


def test_metrics_content_type_is_prometheus_text() -> None:
    _, content_type = Telemetry().render_metrics(GATE)
    assert content_type.startswith("text/plain; version=0.0.4")


def test_duration_buckets_span_kilobytes_to_ten_gigabytes() -> None:
    found = samples(Telemetry())
    bounds = [
        float(re.search(r'le="([^"]+)"', key).group(1))  # type: ignore[union-attr]
        for key in found
        if key.startswith("episode_ingest_upload_duration_seconds_bucket")
    ]
    assert min(bounds) <= 0.01 and max(b for b in bounds if b != float("inf")) >= 1800


def test_unloaded_gate_and_unset_gauges_are_absent_not_zero() -> None:
    gate = {**GATE, "loaded": False, "head_commit": None, "last_refresh_age_seconds": None}
    found = samples(Telemetry(), gate)
    assert found["episode_ingest_gate_loaded"] == 0
    assert "episode_ingest_gate_last_refresh_age_seconds" not in found
    assert "episode_ingest_free_disk_bytes" not in found  # a free disk of 0 would page someone


def test_hostile_host_ids_share_one_label() -> None:
    telemetry = Telemetry()
    for hostile in ("<script>", "../../etc", "a" * 500, "", 'x"y', "lab 1"):
        telemetry.request_finished(event("invalid-id", 400, host=hostile))
    telemetry.request_finished(event("weird outcome\n", 500))

    found = samples(telemetry)

    assert found['episode_ingest_rejections_total{host="invalid",reason="invalid-id"}'] == 6
    assert found['episode_ingest_rejections_total{host="lab-01",reason="other"}'] == 1
    hosts = {
        s.labels["host"]
        for f in text_string_to_metric_families(telemetry.render_metrics(GATE)[0].decode())
        for s in f.samples
        if "host" in s.labels
    }
    assert hosts == {"invalid", "lab-01"}
    assert host_label("lab-07.a_b") == "lab-07.a_b"
    assert host_label("-lab") == "invalid"


def test_host_labels_are_capped() -> None:
    telemetry = Telemetry(max_host_labels=3)
    for number in range(10):
        telemetry.request_finished(event("stale-commit", 412, host=f"lab-{number}"))
    found = samples(telemetry)
    rejections = {k: v for k, v in found.items() if k.startswith("episode_ingest_rejections_total")}
    assert len(rejections) == 4
    assert rejections['episode_ingest_rejections_total{host="other",reason="stale-commit"}'] == 7


# -- ring buffer and stale marks ---------------------------------------------------------


def test_recent_rejections_are_bounded_and_newest_first() -> None:
    telemetry = Telemetry(recent_rejections=3)
    for number in range(5):
        telemetry.request_finished(event("conflict", 409, episode=f"ep-{number}", at=NOW + number))
    telemetry.request_finished(event("stored", 201, size=5))

    recent = telemetry.recent_rejections()

    assert [item["episode"] for item in recent] == ["ep-4", "ep-3", "ep-2"]
    assert recent[0] == {
        "time": NOW + 4,
        "method": "PUT",
        "host": "lab-01",
        "episode": "ep-4",
        "outcome": "conflict",
        "status": 409,
        "commit": HEAD,
        "behind_by": 0,
    }


def test_hostile_strings_are_truncated_in_the_ring_buffer() -> None:
    telemetry = Telemetry()
    telemetry.request_finished(event("invalid-id", 400, host="x" * 100_000))
    assert len(str(telemetry.recent_rejections()[0]["host"])) <= 200


def test_stale_marks_record_the_latest_refusal_and_expire() -> None:
    telemetry = Telemetry(stale_mark_seconds=3600)
    telemetry.request_finished(event("stale-commit", 412, host="lab-03", commit=OLD, at=NOW - 60))
    telemetry.request_finished(
        event("unknown-commit", 412, host="lab-03", commit="c" * 40, behind_by=None, at=NOW - 10)
    )
    telemetry.request_finished(event("stale-commit", 412, host="lab-09", at=NOW - 7200))
    telemetry.request_finished(event("conflict", 409, host="lab-04"))
    telemetry.request_finished(event("stale-commit", 412, host="<bad>"))

    marks = telemetry.stale_hosts(now=NOW)

    assert set(marks) == {"lab-03"}
    assert marks["lab-03"] == {
        "at": NOW - 10,
        "commit": "c" * 40,
        "reason": "unknown-commit",
        "behind_by": None,
        "episode": "ep-1",
        "refusals": 2,
        "accepted_since": None,
    }


def test_a_later_stored_upload_is_noted_on_the_stale_mark() -> None:
    telemetry = Telemetry()
    telemetry.request_finished(event("stale-commit", 412, host="lab-03", at=NOW - 60))
    telemetry.request_finished(event("stored", 201, host="lab-03", size=3, at=NOW - 5))
    assert telemetry.stale_hosts(now=NOW)["lab-03"]["accepted_since"] == NOW - 5


def test_stale_marks_are_bounded() -> None:
    telemetry = Telemetry(max_stale_hosts=2)
    for number in range(5):
        telemetry.request_finished(event("stale-commit", 412, host=f"lab-{number}", at=NOW))
    assert set(telemetry.stale_hosts(now=NOW)) == {"lab-3", "lab-4"}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Telemetry(recent_rejections=0)


# -- status page -------------------------------------------------------------------------


def test_summary_is_a_single_pass_with_newest_row_per_host() -> None:
    rows = [
        row("lab-01", "ep-1", 100, "2026-11-22T10:00:00.000001+00:00", commit="b" * 40),
        row("lab-01", "ep-2", 200, "2026-11-22T11:00:00.000000+00:00", commit=HEAD),
        row("lab-01", "ep-0", 300, "2026-11-22T09:00:00.000000+00:00", commit=OLD),
        row("lab-02", "ep-1", 5, "2026-11-22T08:00:00.000000+00:00", commit=None),
    ]
    summary = summarise_hosts(iter(rows))  # an iterator: a second pass would see nothing
    assert summary["lab-01"].episodes == 3
    assert summary["lab-01"].bytes == 600
    assert summary["lab-01"].last_seen == "2026-11-22T11:00:00.000000+00:00"
    assert summary["lab-01"].last_commit == HEAD
    assert (summary["lab-02"].episodes, summary["lab-02"].last_commit) == (1, None)


def test_page_shows_hosts_counts_commits_and_behind() -> None:
    at = dt.datetime.fromtimestamp(NOW - 300, dt.UTC).isoformat(timespec="microseconds")
    rows = [
        row("lab-01", "ep-1", 1024, at),
        row("lab-01", "ep-2", 2048, at),
        row("lab-02", "ep-1", 10, at, commit="b" * 40),
        row("lab-05", "ep-1", 10, at, commit=OLD),
    ]
    text = page(Telemetry(), iter(rows))
    seen = visible_text(text)

    assert "lab-01 OK 2 3.0 KiB 5 min ago" in seen
    assert "lab-02 OK 1 10 B 5 min ago" in seen
    assert "bbbbbbbbbb 4 behind" in seen
    assert "aaaaaaaaaa outside window" in seen
    assert "ffffffffff at head" in seen
    assert "Gate head (main) ffffffffff" in seen
    assert "No rejections." in seen
    assert 'data-host="lab-01"' in text
    assert "<script" not in text  # works with scripts off; nothing to load either
    assert not re.search(r"(src|href)=", text)


def test_page_marks_stale_hosts_even_without_rows() -> None:
    telemetry = Telemetry()
    telemetry.request_finished(
        event("stale-commit", 412, host="lab-03", commit=OLD, behind_by=12, at=NOW - 40)
    )
    text = page(telemetry)
    seen = visible_text(text)

    assert "lab-03 STALE stale-commit 40 s ago, 12 behind · aaaaaaaaaa 0 0 B never" in seen
    assert re.search(r'data-host="lab-03" data-state="stale"', text)
    assert 'title="refused as stale-commit at' in text
    assert "Stale hosts 1" in seen
    assert "lab-03 ep-1 stale-commit PUT 412 aaaaaaaaaa 12 behind" in seen


def test_page_escapes_hostile_rejection_strings() -> None:
    telemetry = Telemetry()
    telemetry.request_finished(
        event("invalid-id", 400, host="<script>alert(1)</script>", episode='"><img src=x>')
    )
    text = page(telemetry)
    assert "<script>" not in text
    assert "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)</script>" in visible_text(text)


def test_page_banners_for_gate_trouble() -> None:
    failing = page(Telemetry(), gate={**GATE, "last_error": "git log exited 128: <boom>"})
    assert "The last gate refresh failed" in visible_text(failing)
    assert "&lt;boom&gt;" in failing

    never = {**GATE, "loaded": False, "head_commit": None, "last_refresh_age_seconds": None}
    assert "never loaded a window" in visible_text(page(Telemetry(), gate=never))

    off = page(Telemetry(), gate={**GATE, "enabled": False})
    assert "Version gate is OFF" in visible_text(off)
    assert 'id="gate-banner"' not in page(Telemetry())


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(10 * 1024**3) == "10.0 GiB"
    assert human_age(0.2) == "just now"
    assert human_age(59) == "59 s ago"
    assert human_age(3 * 3600) == "3 h ago"
    assert human_age(5 * 86400) == "5 d ago"
    assert human_age(-60).startswith("in the future")


def test_page_draws_the_dataset_by_commit_with_behind_by() -> None:
    commits = {
        HEAD: CommitSummary(7, 7000),
        "b" * 40: CommitSummary(3, 300),
        OLD: CommitSummary(2, 20),
        None: CommitSummary(1, 1),
    }
    text = render_status_page(
        hosts={},
        commits=commits,
        gate_state=GATE,
        gate_positions={HEAD: 0, "b" * 40: 4}.get,
        telemetry=Telemetry(),
        now=NOW,
        version="9.9.9",
    )
    chart = text.split('<svg id="commit-chart"')[1].split("</svg>")[0]
    bars = re.findall(r'<g class="bar (\w+)" data-commit="(\w*)"', chart)
    assert bars == [("good", HEAD), ("warn", "b" * 40), ("bad", OLD), ("muted", "")]
    widths = [int(w) for w in re.findall(r'<rect [^>]*width="(\d+)"', chart)]
    assert widths[0] > widths[1] > widths[2] > 0  # proportional to episodes
    table = visible_text(text.split('id="commits"')[1])
    assert "at head 7" in table and "4 behind 3" in table
    assert "outside the window 2" in table and "unknown 1" in table
    assert "<script" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_page_sums_commits_past_the_bar_limit() -> None:
    commits: dict[str | None, CommitSummary] = {
        f"{n:040x}": CommitSummary(1, 1) for n in range(MAX_COMMITS + 5)
    }
    text = render_status_page(
        hosts={},
        commits=commits,
        gate_state=GATE,
        gate_positions=lambda commit: None,
        telemetry=Telemetry(),
        now=NOW,
        version="9.9.9",
    )
    assert text.count('<g class="bar') == MAX_COMMITS
    assert f"{6} other commits" in text


def test_marks_kept_by_a_shared_keeper_are_written_in_the_background() -> None:
    keeper = MemoryCatalogue()
    one, two = Telemetry(marks=keeper), Telemetry(marks=keeper)
    one.request_finished(event("stale-commit", 412, host="lab-03", at=NOW - 60))
    one.close()
    assert set(two.stale_hosts(now=NOW)) == {"lab-03"}
    assert [item["host"] for item in two.recent_rejections(now=NOW)] == ["lab-03"]
