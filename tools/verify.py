"""`episode-verify`: audit the store against the index, read-only.

Re-hashes every tarball in a bounded thread pool (hashlib and read() release the GIL; one
block per thread in memory) and reports missing, orphaned, mismatched, duplicate, bad and
torn rows. It writes nothing and takes no write lock: safe beside a live receiver. The
index is streamed once into a private, temporary view (receiver.storage.IndexAudit) and the
store's listing into another (tools.listed_blobs), so memory grows with neither the rows
nor the blobs, only with the problems found.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from episode_common.cli_support import fail
from receiver.storage import IndexAudit, NumberedRow, StoredBlob, digest_stream
from tools import cli_common
from tools.catalogue_audit import CatalogueAudit
from tools.listed_blobs import ListedBlobs
from tools.progress import Progress
from tools.scan import Cancelled, bounded_map
from tools.verify_report import Mismatch, VerifyReport

PROG = "episode-verify"
DESCRIPTION = "Audit the store against the index: re-hash every tarball, check every row."
EPILOG = "Exit status: 0 clean, 1 problems found, 2 bad usage or configuration."


@dataclass(frozen=True)
class FileCheck:
    size: int
    sha256: str | None = None  # None with --quick
    error: str | None = None


def _build_parser() -> cli_common.OneLineParser:
    parser = cli_common.OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, metavar="D", help="the receiver's data_dir")
    source.add_argument("--config", type=Path, metavar="F", help="the receiver's config file")
    parser.add_argument("--quick", action="store_true", help="compare sizes only, no hashing")
    cli_common.add_common_arguments(parser)
    return parser


class Verifier:
    def __init__(self, location: cli_common.StoreLocation, *, quick: bool, jobs: int) -> None:
        self.location = location
        self.quick = quick
        self.jobs = jobs
        self.stop = threading.Event()

    def run(self, host: str | None) -> VerifyReport:
        started = time.monotonic()
        report = VerifyReport(quick=self.quick)
        # The index is read before the listing: a file is linked before its row is appended,
        # so every row read here has its file by now unless the file is really gone. Neither
        # pass is kept in memory: private temporary files answer the lookups.
        blobs = self.location.storage.blobs
        with self._audit(host) as audit, ListedBlobs.of(blobs, host) as listed:
            report.rows, report.files, report.stray = audit.rows, listed.count, listed.strays
            report.bad_lines, report.torn_tail = audit.bad_lines, audit.torn_tail
            report.duplicates = audit.duplicates()
            report.missing = list(audit.rows_not_in(listed))
            unindexed: list[tuple[StoredBlob, FileCheck]] = []
            for tarball, check in self._check_all(listed, report):
                numbered = audit.lookup(tarball.key)
                if numbered is not None:
                    self._compare(tarball, numbered, check, report)
                else:
                    unindexed.append((tarball, check))  # few: the problems, or very new
            if unindexed:
                # A receiver may have just linked a file and not yet appended its row.
                audit.catch_up()
                self._settle_unindexed(audit, unindexed, report)
        report.seconds = time.monotonic() - started
        report.sort()
        return report

    def _settle_unindexed(
        self,
        audit: IndexAudit | CatalogueAudit,
        unindexed: list[tuple[StoredBlob, FileCheck]],
        report: VerifyReport,
    ) -> None:
        for tarball, check in unindexed:
            numbered = audit.lookup(tarball.key)
            if numbered is not None:
                self._compare(tarball, numbered, check, report)
            elif check.error is not None:
                report.unreadable.append((tarball, check.error))
            else:
                report.orphaned.append(tarball)

    def _audit(self, host: str | None) -> IndexAudit | CatalogueAudit:
        """index.jsonl's line-level audit, or a database catalogue's rows."""
        if self.location.index_path is not None:
            return IndexAudit(self.location.index_path, host)
        catalogue = self.location.storage.catalogue
        catalogue.open()
        return CatalogueAudit(catalogue, host)

    def _check_all(
        self, listed: ListedBlobs, report: VerifyReport
    ) -> Iterator[tuple[StoredBlob, FileCheck]]:
        """Each listed blob with what reading it found, streamed (in completion order)."""
        if self.quick:
            yield from ((tarball, FileCheck(tarball.size_bytes)) for tarball in listed)
            return
        progress = Progress("verify", listed.count, listed.bytes)

        def on_block(block: bytes) -> None:
            if self.stop.is_set():
                raise Cancelled
            progress.add_bytes(len(block))

        blobs = self.location.storage.blobs

        def check(tarball: StoredBlob) -> FileCheck:
            try:
                with blobs.open_read(tarball.host_id, tarball.episode_id) as handle:
                    sha256, size = digest_stream(handle, on_block)
            except OSError as error:
                return FileCheck(0, error=f"cannot read: {error.strerror or error}")
            finally:
                progress.file_done()
            return FileCheck(size, sha256)

        try:
            yield from bounded_map(check, listed, self.jobs, self.stop)
        finally:
            progress.close()
            report.bytes_read = progress.bytes_done

    @staticmethod
    def _compare(
        tarball: StoredBlob, numbered: NumberedRow, check: FileCheck, report: VerifyReport
    ) -> None:
        row = numbered.row
        if check.error is not None:
            report.unreadable.append((tarball, check.error))
        elif check.size != row.size_bytes:
            report.size_mismatch.append(Mismatch(tarball, numbered, check.size))
        elif check.sha256 is not None and check.sha256 != row.sha256:
            report.sha256_mismatch.append(Mismatch(tarball, numbered, check.sha256))


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    cli_common.check_common_arguments(PROG, args)
    if args.config is not None:
        location = cli_common.from_config(PROG, args.config)
    else:
        location = cli_common.from_data_dir(PROG, args.data_dir)
    try:
        report = Verifier(location, quick=args.quick, jobs=args.jobs).run(args.host)
    except OSError as error:  # the index or a directory could not be read at all
        fail(PROG, f"cannot read the store: {error}")
    except KeyboardInterrupt:
        fail(PROG, "interrupted", 130)
    if args.json:
        cli_common.write_json(report.to_json(location, args.host))
    else:
        print("\n".join(report.text_lines(PROG, location)))
    return cli_common.EXIT_PROBLEMS if report.problems else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
