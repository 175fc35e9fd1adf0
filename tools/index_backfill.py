"""`episode-backfill`: append index rows for stored tarballs that have none.

Idempotent and safe beside a live receiver: every row goes through the catalogue's
append_if_absent (the exactly-once arbiter), and a tarball whose id a receiver has claimed
is left to that receiver. Rows carry "backfilled": true.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from episode_common.cli_support import fail, setup_logging
from receiver.config import FilesystemStorageConfig
from receiver.storage import CatalogueCorrupt, DurabilityError, IndexRow, StoredBlob
from tools import cli_common
from tools.backfill_report import BackfillReport, Unreadable, inspect_tarball
from tools.listed_blobs import ListedBlobs
from tools.progress import Progress
from tools.scan import bounded_map

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
        on_disk = isinstance(location.config, FilesystemStorageConfig)  # s3: a bucket
        if on_disk and not location.episodes_root.is_dir():
            fail(PROG, f"episodes root {location.episodes_root} does not exist")
        return location
    if args.episodes_root is None or args.index is None:
        fail(PROG, "give --config F, or both --episodes-root D and --index F")
    return cli_common.from_paths(PROG, args.episodes_root, args.index)


class Backfill:
    """One run: list, read each unindexed tarball, append (or in a dry run, list) its row."""

    def __init__(self, location: cli_common.StoreLocation, *, dry_run: bool, jobs: int) -> None:
        self.location = location
        self.storage = location.storage
        self.dry_run = dry_run
        self.jobs = jobs
        self.stop = threading.Event()

    def run(self, host: str | None) -> BackfillReport:
        catalogue = self.storage.catalogue
        try:
            # A torn tail is a dead writer's half row (live writers hold the lock while
            # appending): cut now, as the receiver does at start, even if nothing is added.
            state = catalogue.recover(repair=not self.dry_run)
        except CatalogueCorrupt as error:
            fail(PROG, f"{error} (episode-verify lists every such line)")

        def unindexed(blob: StoredBlob) -> bool:
            return catalogue.lookup(blob.host_id, blob.episode_id) is None

        # The listing streams into a private file, keeping only the blobs with no row: a
        # store of millions of blobs is never held in memory.
        try:
            with ListedBlobs.of(self.storage.blobs, host, keep=unindexed) as todo:
                report = BackfillReport(
                    dry_run=self.dry_run, scanned=todo.listed, skipped=todo.strays
                )
                report.torn_tail_bytes = state.torn_tail_bytes  # dry run: what a run would cut
                report.already_indexed = todo.listed - todo.count
                self._read_all(todo, report)
        finally:
            catalogue.close()
        return report

    def _read_all(self, todo: ListedBlobs, report: BackfillReport) -> None:
        progress = Progress("backfill", todo.count, todo.bytes)
        storage = self.location.config
        blobs = self.storage.blobs

        def read(tarball: StoredBlob) -> IndexRow | Unreadable:
            try:
                return inspect_tarball(blobs, tarball, storage, progress.add_bytes, self.stop)
            finally:
                progress.file_done()

        try:
            for tarball, outcome in bounded_map(read, todo, self.jobs, self.stop):
                if isinstance(outcome, Unreadable):
                    report.unreadable.append((tarball, outcome.reason))
                elif self.dry_run:
                    report.would_add.append(outcome)
                else:
                    self._append(outcome, tarball, report)
        finally:
            progress.close()

    def _append(self, row: IndexRow, tarball: StoredBlob, report: BackfillReport) -> None:
        # A receiver claims the id from before the blob appears until its row is written:
        # while it is claimed, the row is the receiver's to write.
        catalogue = self.storage.catalogue
        try:
            claimed = catalogue.claim(row.host_id, row.episode_id)
        except OSError as error:
            fail(PROG, f"cannot claim {row.host_id}/{row.episode_id}: {error.strerror}")
        if not claimed:
            report.in_flight.append(tarball)
            return
        try:
            _, appended = catalogue.append_if_absent(row)
        finally:
            catalogue.release(row.host_id, row.episode_id)
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
