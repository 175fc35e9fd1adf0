"""`python -m bench [--quick] [--runs K] [--only a,b] [size flags]`: the benchmark suite.

Each figure measures its baseline in the same run as the product (this machine's disk
drifts between runs; only same-run ratios mean anything) and prints min/median/max of
product, baseline and ratio over the runs, then a one-line-per-figure summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import (
    figures_fleet,
    figures_ops,
    figures_postgres,
    figures_s3,
    figures_upload,
    figures_view,
    figures_view_receiver,
    figures_wrk,
)
from bench.receivers import Bench, compile_bytecode
from bench.report import Figure, print_figure, summary_lines
from bench.sizes import QUICK, Sizes

Measure = Callable[[Bench], list[Figure]]

# Figure groups, in running order; a group measures the figures named with it.
GROUPS: list[tuple[tuple[str, ...], Measure]] = [
    (("upload", "nginx"), figures_upload.single_upload),
    (("concurrent",), figures_upload.concurrent_uploads),
    (("rss",), figures_upload.peak_rss),
    (("small", "gate"), figures_ops.small_uploads),
    (("small-wrk",), figures_wrk.small_uploads_wrk),
    (("cold-start",), figures_ops.cold_start),
    (("pack",), figures_ops.pack),
    (("verify",), figures_ops.verify),
    (("view-build", "view-open", "view-lookup", "view-status"), figures_view.view_figures),
    (("view-ready", "view-rss", "view-head"), figures_view_receiver.receiver_view_figures),
    (("pg-small", "pg-rows"), figures_postgres.postgres),
    (("s3-upload", "s3-concurrent", "s3-rss"), figures_s3.s3_figures),
    (("fleet",), figures_fleet.fleet),
]
FIGURES = [key for keys, _ in GROUPS for key in keys]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code only")
    parser.add_argument("--only", help=f"comma-separated figures of {','.join(FIGURES)}")
    parser.add_argument("--dir", type=Path, help="scratch directory (on the disk to measure)")
    for field in dataclasses.fields(Sizes):
        if field.name == "only":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name == "rss_mib":
            parser.add_argument(flag, help="comma-separated upload sizes in MiB")
        else:
            parser.add_argument(flag, type=float if "seconds" in field.name else int)
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, object] = {}
    for field in dataclasses.fields(Sizes):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "only":
            changes[field.name] = value
    if args.rss_mib is not None:
        changes["rss_mib"] = tuple(int(part) for part in args.rss_mib.split(","))
    if args.only:
        only = frozenset(part.strip() for part in args.only.split(","))
        unknown = only - set(FIGURES)
        if unknown:
            raise SystemExit(f"python -m bench: unknown figure(s) {', '.join(sorted(unknown))}")
        changes["only"] = only
    return dataclasses.replace(sizes, **changes)  # type: ignore[arg-type]


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_line() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {os.cpu_count()} cpus, {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {_load()}"
    )


def run(argv: Sequence[str] | None = None) -> list[Figure]:
    args = _parser().parse_args(argv)
    sizes = sizes_from(args)
    print(time.strftime("episode-ingest bench, %Y-%m-%d %H:%M:%S %Z"))
    print(machine_line())
    print(f"sizes: {sizes}", flush=True)
    figures: list[Figure] = []
    compile_bytecode()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="episode-bench-") as scratch:
        bench = Bench.create(Path(scratch), sizes)
        for keys, measure in GROUPS:
            if sizes.only and not sizes.only & set(keys):
                continue
            print(f"\n-- {', '.join(keys)}: load average {_load()} before", flush=True)
            for figure in measure(bench):
                if not sizes.only or figure.key in sizes.only:
                    print_figure(figure)
                    sys.stdout.flush()
                    figures.append(figure)
        shutil.rmtree(bench.root / "repo", ignore_errors=True)
    print("\n".join(summary_lines(figures)))
    print(f"load average at the end: {_load()}")
    return figures


def main() -> None:
    run()


if __name__ == "__main__":
    main()
