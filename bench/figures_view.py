"""The jsonl catalogue's SQLite view at scale, in process: build rate, open when current,
already-stored lookup p99 against a 1,000-row index, and the status page's summaries.

The index is written with msgspec in chunks (C speed); each figure's baseline is measured
in the same run on the same file.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec

from bench.receivers import Bench
from bench.report import Figure, Target, median
from receiver.storage.jsonl import JsonlCatalogue
from receiver.storage.rows import IndexRow, decode_row

HOSTS, COMMITS, CHUNK = 1000, 50, 200_000


def write_rows(path: Path, rows: int) -> None:
    encoder = msgspec.json.Encoder()
    commits = [f"{n:040x}" for n in range(COMMITS)]
    with path.open("wb") as handle:
        for start in range(0, rows, CHUNK):
            handle.write(
                encoder.encode_lines(
                    [
                        IndexRow(
                            commit=commits[n % COMMITS],
                            episode_id=f"ep-{n:09d}",
                            host_id=f"lab-{n % HOSTS:04d}",
                            received_at_wall="2026-11-22T10:00:00.123456+00:00",
                            schema_version=1,
                            sha256="0" * 64,
                            size_bytes=1000 + n % 977,
                        )
                        for n in range(start, min(rows, start + CHUNK))
                    ]
                )
            )


def _decode_all(path: Path) -> int:
    """The floor of any build: decode every line once, keep nothing."""
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            decode_row(line)
            count += 1
    return count


def _p99_lookup(catalogue: JsonlCatalogue, rows: int, samples: int = 2000) -> float:
    times = []
    for number in range(samples):
        n = (number * 7919) % rows
        began = time.perf_counter()
        assert catalogue.lookup(f"lab-{n % HOSTS:04d}", f"ep-{n:09d}") is not None
        times.append(time.perf_counter() - began)
    times.sort()
    return times[int(len(times) * 0.99)]


def view_figures(bench: Bench) -> list[Figure]:
    rows = bench.sizes.view_rows
    root = bench.root / "view"
    root.mkdir(exist_ok=True)
    big, small = root / "big.jsonl", root / "small.jsonl"
    began = time.perf_counter()
    write_rows(big, rows)
    write_rows(small, 1000)
    generated = time.perf_counter() - began
    build = Figure(
        "view-build",
        f"build the view of {rows} rows",
        "rows/s",
        "build",
        "decode only",
        Target(">= 300,000 rows/s", lambda f: median(f.product) >= 3e5),
        ratio_label="build / decode",
    )
    build.notes.append(f"index of {rows} rows written in {generated:.1f} s")
    opened = Figure(
        "view-open",
        f"open with the view current, {rows} rows",
        "s",
        "open",
        "stat+read 4 KiB",
        Target("<= 1.0 s", lambda f: median(f.product) <= 1.0),
    )
    head = Figure(
        "view-lookup",
        f"stored-row lookup p99, {rows} vs 1,000 rows",
        "s",
        f"{rows} rows",
        "1,000 rows",
        Target("ratio <= 1.5", lambda f: median(f.ratios) <= 1.5),
    )
    status = Figure(
        "view-status",
        f"host + commit summaries, {rows} rows, {HOSTS} hosts",
        "s",
        "summaries",
        "1,000 rows",
        Target("<= 0.1 s", lambda f: median(f.product) <= 0.1),
    )
    logging.getLogger("receiver.storage.jsonl_sync").setLevel(logging.WARNING)
    for _ in range(bench.sizes.runs):
        for leftover in root.glob("*.sqlite3*"):
            leftover.unlink()
        began = time.perf_counter()
        decoded = _decode_all(big)
        decode_rate = decoded / (time.perf_counter() - began)
        catalogue = JsonlCatalogue(big)
        began = time.perf_counter()
        catalogue.recover()
        build.add(rows / (time.perf_counter() - began), decode_rate)
        catalogue.close()
        began = time.perf_counter()
        current = JsonlCatalogue(big)
        current.open()
        open_seconds = time.perf_counter() - began
        began = time.perf_counter()
        with big.open("rb") as handle:
            os.fstat(handle.fileno())
            handle.read(4096)
        opened.add(open_seconds, time.perf_counter() - began)
        tiny = JsonlCatalogue(small)
        tiny.recover()
        head.add(_p99_lookup(current, rows), _p99_lookup(tiny, 1000))
        status.add(_timed_summaries(current), _timed_summaries(tiny))
        current.close()
        tiny.close()
    return [build, opened, head, status]


def _timed_summaries(catalogue: JsonlCatalogue) -> float:
    began = time.perf_counter()
    assert catalogue.host_summaries() and catalogue.commit_summaries()
    return time.perf_counter() - began
