"""`episode-index export` (and `migrate`): append to FILE, in commit order, the rows it lacks.

FILE is itself the source of truth for where to resume: its last complete row names the
row to continue after, so a crash (a torn last line is cut first) neither duplicates nor
skips a row. Each batch is written and fsynced before the next; one run per FILE at once.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from episode_common.cli_support import fail, setup_logging
from episode_common.durable import fsync_dir
from receiver.storage import (
    BackendUnavailable,
    Catalogue,
    CatalogueCorrupt,
    IndexRow,
    decode_row,
    encode_row,
)
from tools import cli_common
from tools.index_migrate import MigrationError, migrate

PROG = "episode-index"
EPILOG = (
    "Exit status: 0 FILE holds every row, 1 FILE could not be brought up to date (another "
    "export is running on it, it holds a row the catalogue does not), 2 bad usage or config."
)
BATCH_ROWS = 10_000


def _build_parser() -> cli_common.OneLineParser:
    parser = cli_common.OneLineParser(prog=PROG, description="The catalogue, as a jsonl file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="append the rows FILE lacks, in commit order",
        description="Append to FILE, in commit order, the catalogue rows it does not hold yet.",
        epilog=EPILOG,
    )
    export.add_argument("--config", type=Path, required=True, help="the receiver's config file")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the jsonl file")
    move = commands.add_parser(
        "migrate",
        help="copy every blob and row of one store into other backends",
        description="Copy every blob and row of the store of --from into the backends of "
        "--config (e.g. jsonl + filesystem onto PostgreSQL + S3), rows as they were, "
        "each blob verified before its row; re-running resumes. The source is only read.",
    )
    move.add_argument("--from", dest="source", type=Path, required=True, metavar="F",
                      help="the config of the store to copy from")  # fmt: skip
    move.add_argument("--config", type=Path, required=True, help="the config to copy into")
    return parser


@contextmanager
def _only_run(out: Path) -> Iterator[None]:
    """An exclusive lock beside FILE for the whole run; a second run gives up at once."""
    lock_path = out.with_name(out.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(PROG, f"another export to {out} is running", code=cli_common.EXIT_PROBLEMS)
        yield
    finally:
        os.close(fd)


def _resume_point(fd: int, out: Path) -> tuple[str, str] | None:
    """Cut a torn last line (a crash mid-write); the key of the last complete row, if any."""
    size = os.fstat(fd).st_size
    keep = _end_of_complete_lines(fd, size)
    if keep != size:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    if keep == 0:
        return None
    start = _start_of_last_line(fd, keep)
    line = os.pread(fd, keep - start, start)
    try:
        return decode_row(line).key
    except (msgspec.DecodeError, msgspec.ValidationError):
        fail(PROG, f"{out}: its last line is not a catalogue row", code=cli_common.EXIT_PROBLEMS)


def _end_of_complete_lines(fd: int, size: int) -> int:
    start = size
    while start > 0:
        begin = max(0, start - 65536)
        newline = os.pread(fd, start - begin, begin).rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        start = begin
    return 0


def _start_of_last_line(fd: int, end: int) -> int:
    return _end_of_complete_lines(fd, end - 1)  # the newline before the last one


def _append(fd: int, rows: Iterator[IndexRow]) -> int:
    """Write rows in fsynced batches; returns how many."""
    written = 0
    batch: list[bytes] = []
    for row in rows:
        batch.append(encode_row(row))
        if len(batch) >= BATCH_ROWS:
            written += _flush(fd, batch)
    return written + _flush(fd, batch)


def _flush(fd: int, batch: list[bytes]) -> int:
    if not batch:
        return 0
    data = memoryview(b"".join(batch))
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)
    count = len(batch)
    batch.clear()
    return count


def export(catalogue: Catalogue, out: Path) -> int:
    """Bring FILE up to date; returns the number of rows appended."""
    created = not out.exists()
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        if created:
            fsync_dir(out.parent)
        after = _resume_point(fd, out)
        try:
            rows = catalogue.rows_after(after)
        except KeyError:
            fail(
                PROG,
                f"{out}: its last row ({after[0]}/{after[1]}) is not in this catalogue"
                if after
                else f"{out}: cannot resume",
                code=cli_common.EXIT_PROBLEMS,
            )
        return _append(fd, rows)
    finally:
        os.close(fd)


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "migrate":
        return _run_migrate(args.source, args.config)
    return _run_export(args.config, args.out)


def _run_migrate(source_config: Path, target_config: Path) -> int:
    source = cli_common.from_config(PROG, source_config).storage
    target = cli_common.from_config(PROG, target_config, create=True).storage
    setup_logging("WARNING")
    try:
        target.blobs.prepare()
        target.catalogue.recover()
        source.catalogue.open()
        target.catalogue.open()
        report = migrate(source, target)
    except (MigrationError, CatalogueCorrupt, BackendUnavailable, OSError) as error:
        fail(PROG, f"migrate stopped: {error} (re-run to resume)", code=cli_common.EXIT_PROBLEMS)
    finally:
        source.close()
        target.close()
    print(
        f"{PROG}: migrated: {report.copied_blobs} blobs copied ({report.bytes_copied} bytes), "
        f"{report.added_rows} rows added, {report.already_there} already there"
    )
    return 0


def _run_export(config: Path, out_arg: Path) -> int:
    location = cli_common.from_config(PROG, config)
    out = out_arg.absolute()
    if not out.parent.is_dir():
        fail(PROG, f"the directory of {out} does not exist")
    index = location.index_path
    if out.exists() and index is not None and out.resolve() == index.resolve():
        fail(PROG, f"{out} is the catalogue's own index; export to another file")
    setup_logging("WARNING")
    with _only_run(out):
        try:
            location.storage.catalogue.open()
            appended = export(location.storage.catalogue, out)
        except CatalogueCorrupt as error:
            fail(PROG, str(error), code=cli_common.EXIT_PROBLEMS)
        except OSError as error:
            # Rows appended so far are complete and fsynced; a re-run resumes after them.
            fail(PROG, f"stopped: {error}", code=cli_common.EXIT_PROBLEMS)
        finally:
            location.storage.close()
    print(f"{PROG}: {out}: appended {appended} rows")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
