"""Small uploads driven by `wrk` (a C load generator that costs the two cores little) beside
the same-run 16-thread write+fsync+rename loop, with the Python client's rate as a note,
and the floor under it: wrk against bench/floor_app.py (the same uvicorn and Starlette doing
only the storage work of a small upload) in the same run.

wrk runs one thread with `small_clients` connections and a Lua script that PUTs the same
valid 64 KiB tarball under a fresh id each time, with the commit header; once
`small_uploads` answers are in, its thread stops and writes a marker file; the bench then
sends wrk SIGINT, which ends its run early (summary and done() as usual).
Any answer but 201 fails the figure.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.baselines import Unavailable, need, small_file_loop
from bench.figures_ops import put_load
from bench.floor import FloorServer
from bench.receivers import Bench, receiver
from bench.report import Figure, at_least, spread
from bench.workload import write_episode_tarball

# args: answers wanted, body file, commit, run tag, hosts (ids spread over them: at most 2
# in flight per host, under the default per-host cap of 4), marker file.
LUA = r"""
local wanted, body, commit, tag, hosts, marker
local sent, answered, bad, first_bad = 0, 0, 0, ""
function init(args)
  wanted = tonumber(args[1])
  local file = assert(io.open(args[2], "rb"))
  body = file:read("*a")
  file:close()
  commit, tag, hosts, marker = args[3], args[4], tonumber(args[5]), args[6]
end
function request()
  sent = sent + 1
  local path = string.format("/episodes/wrk-%02d/%s-%07d", sent % hosts, tag, sent)
  return wrk.format("PUT", path, {["X-Code-Commit"] = commit,
                                  ["Content-Type"] = "application/octet-stream"}, body)
end
function response(status, headers, answer)
  answered = answered + 1
  if status ~= 201 then
    bad = bad + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.sub(answer, 1, 200)
      io.write("BAD " .. first_bad .. "\n")
    end
  end
  if answered == wanted then
    wrk.thread:stop()
    assert(io.open(marker, "w")):close()
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "p99_us": %d, "errors": %d, "connect": %d,'
    .. ' "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(99.0),
    e.connect + e.read + e.write + e.status + e.timeout,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
# Per-thread counters are not visible in done(); a non-201 shows as errors.status there.


def _wrk(
    wrk: str, script: Path, port: int, count: int, clients: int, args: list[str]
) -> dict[str, int]:
    """Run wrk until count answers; its summary (requests, duration, p99, errors)."""
    marker = script.with_name("answered")
    marker.unlink(missing_ok=True)
    command = [
        wrk,
        "-t1",
        f"-c{clients}",
        "-d600s",
        "--timeout",
        "60s",
        "--latency",
        "-s",
        str(script),
    ]
    command += [f"http://127.0.0.1:{port}/", "--", str(count), *args, str(marker)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # ends wrk's timed wait: it joins and reports
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                continue
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith("WRK ")]
    if not lines:
        raise RuntimeError(f"wrk printed no summary (exit {proc.returncode}): {output[-600:]}")
    summary: dict[str, int] = json.loads(lines[-1][4:])
    if summary["errors"]:
        bad = [line for line in output.splitlines() if line.startswith("BAD ")]
        raise RuntimeError(f"wrk: requests failed or did not answer 201: {summary} {bad[:1]}")
    return summary


def small_uploads_wrk(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    count, clients, workers = sizes.small_uploads, sizes.small_clients, sizes.workers
    figure = Figure(
        "small-wrk",
        f"{count} uploads of {sizes.small_kib} KiB by wrk, {clients} connections, "
        f"full durability, workers = {workers}",
        "req/s",
        "receiver PUTs until 201 (wrk)",
        f"{clients}-thread write+fsync+rename",
        at_least(0.5),
    )
    try:
        wrk = need("wrk")
    except Unavailable:
        figure.unavailable = "install wrk (Debian package wrk)"
        return [figure]
    home = bench.fresh_dir("small-wrk")
    src = home / "small.tar.zst"
    size = write_episode_tarball(bench.pool, src, bench.commit, sizes.small_kib * 1024)
    script = home / "put.lua"
    script.write_text(LUA)
    python_rates: list[float] = []
    wrk_p99: list[float] = []
    floor_rates: list[float] = []
    hosts = str(max(1, clients // 2))

    def wrk_run(port: int, tag: str) -> tuple[float, float]:
        """(req/s, p99 ms) of one wrk run against the server on port."""
        summary = _wrk(wrk, script, port, count, clients, [str(src), bench.commit, tag, hosts])
        return summary["requests"] / (summary["duration_us"] / 1e6), summary["p99_us"] / 1e3

    with (
        receiver(bench, "small-wrk/receiver", workers=workers) as process,
        FloorServer(home / "floor", workers) as floor,
    ):
        for run in range(sizes.runs):
            rate, _ = small_file_loop(home / "loop", count, size, clients)
            product, p99 = wrk_run(process.port, f"w{run}")
            figure.add(product, rate)
            wrk_p99.append(p99)
            floor_rates.append(wrk_run(floor.port, f"f{run}")[0])
            body = src.read_bytes()
            began = time.perf_counter()
            put_load(process.port, count, clients, f"p{run}", body, bench.commit, host="up")
            python_rates.append(count / (time.perf_counter() - began))
    figure.notes.append(f"body {size} bytes; wrk p99 {spread(wrk_p99)} ms")
    figure.notes.append(
        f"Python client (16 threads, same receiver, same run) {spread(python_rates)} req/s"
    )
    floor_ratios = [f / b for f, b in zip(floor_rates, figure.baseline, strict=True)]
    figure.notes.append(
        f"floor (bench/floor_app.py by wrk: the storage syscalls alone under uvicorn + "
        f"Starlette, same run) {spread(floor_rates)} req/s; floor / baseline "
        f"{spread(floor_ratios)}"
    )
    shutil.rmtree(home)
    return [figure]
