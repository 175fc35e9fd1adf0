"""`episode-backfill`: append index rows for stored tarballs that have none.

Idempotent and safe beside a live receiver: every row goes through JsonlIndex.append_if_absent
(catch up, check and append under the index lock, torn tail cut first), and a tarball whose
episode lock a receiver holds is left to that receiver. Rows carry "backfilled": true.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from episode_common.cli_support import fail, setup_logging
from receiver.index import DurabilityError, IndexCorrupt, IndexRow, JsonlIndex
from receiver.locks import EpisodeLocks
from tools import cli_common
from tools.backfill_report import BackfillReport, Unreadable, inspect_tarball
from tools.progress import Progress
from tools.scan import Tarball, bounded_map, scan_episodes

PROG = "episode-backfill"
DESCRIPTION = "Append index rows for stored tarballs that have none."
EPILOG = (
    "Exit status: 0 every tarball is indexed (or being indexed by a live receiver), "
    "1 some tarballs are unreadable or the index could not be written, "
    "2 bad usage or configuration."
)


def _build_parser() -> cli_common.OneLineParser:
    parser = cli_common.OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--episodes-root", type=Path, metavar="D", help="the episodes/ directory")
    parser.add_argument("--index", type=Path, metavar="F", help="the index.jsonl to append to")
    parser.add_argument("--config", type=Path, metavar="F", help="the receiver's config file")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the rows it would add; write nothing"
    )
    cli_common.add_common_arguments(parser)
    return parser


def _location(args: argparse.Namespace) -> cli_common.StoreLocation:
    explicit = args.episodes_root is not None or args.index is not None
    if args.config is not None and explicit:
        fail(PROG, "give either --config or --episodes-root with --index, not both")
    if args.config is not None:
        location = cli_common.from_config(PROG, args.config)
        if not location.episodes_root.is_dir():
            fail(PROG, f"episodes root {location.episodes_root} does not exist")
        return location
    if args.episodes_root is None or args.index is None:
        fail(PROG, "give --config F, or both --episodes-root D and --index F")
    return cli_common.from_paths(PROG, args.episodes_root, args.index)


class Backfill:
    """One run: scan, read each unindexed tarball, append (or in a dry run, list) its row."""

    def __init__(self, location: cli_common.StoreLocation, *, dry_run: bool, jobs: int) -> None:
        self.location = location
        self.dry_run = dry_run
        self.jobs = jobs
        self.index = JsonlIndex(location.index_path)
        self.stop = threading.Event()

    def run(self, host: str | None) -> BackfillReport:
        try:
            self.index.load(strict=True)
        except IndexCorrupt as error:
            fail(PROG, f"{error} (episode-verify lists every such line)")
        tarballs, strays = scan_episodes(self.location.store, host)
        report = BackfillReport(dry_run=self.dry_run, scanned=len(tarballs), skipped=strays)
        todo = [t for t in tarballs if self.index.lookup(t.host_id, t.episode_id) is None]
        report.already_indexed = len(tarballs) - len(todo)
        if self.dry_run:
            report.torn_tail_bytes = self.index.torn_tail_bytes()  # what a real run would cut
            self._read_all(todo, report, locks=None)
            return report
        locks = self._open_locks()
        try:
            # A torn tail is a dead writer's half row (live writers hold this lock while
            # appending): cut it now, as the receiver does at start, even if nothing is added.
            with self.index.locked():
                report.torn_tail_bytes = self.index.repair_torn_tail()
            self._read_all(todo, report, locks)
        finally:
            locks.close()
        return report

    def _open_locks(self) -> EpisodeLocks:
        path = self.location.episode_lock_path
        try:
            return EpisodeLocks(path)
        except OSError as error:
            fail(PROG, f"cannot open the receiver's lock file {path}: {error.strerror}")

    def _read_all(
        self, todo: list[Tarball], report: BackfillReport, locks: EpisodeLocks | None
    ) -> None:
        progress = Progress("backfill", len(todo), sum(t.size for t in todo))
        storage = self.location.storage

        def read(tarball: Tarball) -> IndexRow | Unreadable:
            try:
                return inspect_tarball(tarball, storage, progress.add_bytes, self.stop)
            finally:
                progress.file_done()

        try:
            for tarball, outcome in bounded_map(read, todo, self.jobs, self.stop):
                if isinstance(outcome, Unreadable):
                    report.unreadable.append((tarball, outcome.reason))
                elif locks is None:
                    report.would_add.append(outcome)
                else:
                    self._append(outcome, tarball, report, locks)
        finally:
            progress.close()

    def _append(
        self, row: IndexRow, tarball: Tarball, report: BackfillReport, locks: EpisodeLocks
    ) -> None:
        # A receiver holds the episode lock from before the file appears until its row is
        # written: while it is held, the row is the receiver's to write.
        if not locks.try_acquire(row.host_id, row.episode_id):
            report.in_flight.append(tarball)
            return
        try:
            _, appended = self.index.append_if_absent(row)
        finally:
            locks.release(row.host_id, row.episode_id)
        if appended:
            report.added.append(row)
        else:
            report.already_indexed += 1  # a receiver indexed it while we read it


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    cli_common.check_common_arguments(PROG, args)
    location = _location(args)
    setup_logging("WARNING")  # the index's own warnings (a torn tail cut) reach the operator
    backfill = Backfill(location, dry_run=args.dry_run, jobs=args.jobs)
    try:
        report = backfill.run(args.host)
    except (DurabilityError, OSError) as error:
        # Rows appended so far are complete and fsynced; a re-run resumes where this stopped.
        fail(PROG, f"stopped: {error}", code=cli_common.EXIT_PROBLEMS)
    except KeyboardInterrupt:
        fail(PROG, "interrupted; rows appended so far are complete, run again to finish", 130)
    if args.json:
        cli_common.write_json(report.to_json(location))
    else:
        report.print_text(PROG, location)
    return cli_common.EXIT_PROBLEMS if report.unreadable else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
