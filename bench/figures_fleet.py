"""Two receivers behind nginx against one receiver: one SeaweedFS bucket, one PostgreSQL catalogue.

nginx runs the shipped etc/nginx/episode-ingest.conf (tests/nginx.py changes only its
addresses). Every receiver has its own data dir, workers = 1, the s3 backend on the same
server and bucket, and the postgresql catalogue on the same database; the single receiver
is the baseline, measured in the same run with the same 8 concurrent uploads.
"""

from __future__ import annotations

import contextlib
import shutil
import time

from bench.figures_s3 import (
    concurrently,
    empty_bucket,
    rate,
    size_label,
    start_seaweed,
    storage_section,
)
from bench.receivers import Bench, cpu_seconds, receiver
from bench.report import Figure, Target, spread
from bench.workload import MiB, write_episode_tarball
from tests.nginx import start_nginx
from tests.postgres import start_postgres


def fleet(bench: Bench) -> list[Figure]:
    sizes = bench.sizes
    count = sizes.concurrent_uploads
    figure = Figure(
        "fleet",
        f"{count} concurrent {size_label(sizes.fleet_mib)} uploads: two receivers behind nginx "
        "vs one, one SeaweedFS bucket, one PostgreSQL catalogue",
        "MB/s",
        "2 receivers behind nginx, aggregate",
        "1 receiver, aggregate",
        Target("reported (two cores: the receivers share them with SeaweedFS)", lambda f: True),
    )
    home = bench.fresh_dir("fleet")
    server = start_seaweed(home / "seaweed", [figure])
    if server is None:
        shutil.rmtree(home)
        return [figure]
    try:
        postgres = start_postgres()
    except (RuntimeError, OSError) as error:
        server.stop()
        shutil.rmtree(home)
        figure.unavailable = f"PostgreSQL cannot run here ({error})"
        return [figure]
    assert server.proc is not None
    cpu: dict[str, list[float]] = {"fleet": [], "single": [], "store": []}
    try:
        storage = storage_section(bench, server, home)
        index = {"type": "postgresql", "dsn": postgres.create_database("bench_fleet")}
        src = home / "episode.tar.zst"
        size = write_episode_tarball(bench.pool, src, bench.commit, sizes.fleet_mib * MiB)
        with contextlib.ExitStack() as stack:
            members = [
                stack.enter_context(
                    receiver(bench, f"fleet/receiver-{n}", storage=storage, index=index)
                )
                for n in range(2)
            ]
            single = stack.enter_context(
                receiver(bench, "fleet/single", storage=storage, index=index)
            )
            try:
                nginx = start_nginx(home / "nginx", [member.port for member in members])
            except (RuntimeError, OSError) as error:
                figure.unavailable = f"nginx cannot run here ({str(error).strip()[:200]})"
                return [figure]
            stack.callback(nginx.stop)
            fleet_pids = [m.proc.pid for m in members if m.proc is not None]
            single_pids = [single.proc.pid] if single.proc is not None else []
            for run in range(sizes.runs):
                # Alternated, so neither always meets the store's state the other left.
                order = ["fleet", "single"] if run % 2 == 0 else ["single", "fleet"]
                results: dict[str, float] = {}
                for which in order:
                    target, pids = (
                        (nginx.port, fleet_pids) if which == "fleet" else (single.port, single_pids)
                    )
                    before, store = cpu_seconds(pids), cpu_seconds([server.proc.pid])
                    started = time.perf_counter()
                    concurrently(target, count, f"{which}-{run}", src, bench.commit)
                    results[which] = rate(size * count, started)
                    gib = size * count / 2**30
                    cpu[which].append((cpu_seconds(pids) - before) / gib)
                    cpu["store"].append((cpu_seconds([server.proc.pid]) - store) / gib)
                    empty_bucket(server)
                figure.add(results["fleet"], results["single"])
    finally:
        postgres.destroy()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    figure.notes.append(f"receivers' CPU, two behind nginx {spread(cpu['fleet'])} s per GiB")
    figure.notes.append(f"receiver's CPU, one alone        {spread(cpu['single'])} s per GiB")
    figure.notes.append(f"SeaweedFS CPU                    {spread(cpu['store'])} s per GiB")
    return [figure]
