"""`episode-shipper`: run, once, status, retry, init.

Bad usage and bad configuration print one line and exit 2; `once` exits 0 when
everything is shipped, 1 when some episodes wait for a retry, 3 when some are fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import tomli_w

from episode_common.cli_support import fail, setup_logging
from episode_common.config_loading import ConfigError
from episode_common.durable import fsync_dir
from shipper import __version__, lockfile
from shipper.config import ShipperConfig, from_mapping, load_config, read_token
from shipper.daemon import Daemon
from shipper.progress import ClearLine, Progress
from shipper.queue import Queue, QueueError
from shipper.report import render_text, retry_hint_config, status_document
from shipper.spool import unpadded_commit
from shipper.states import State, connect
from shipper.upload import ReceiverClient

PROG = "episode-shipper"
EXIT_SHIPPED, EXIT_RETRYING, EXIT_FATAL = 0, 1, 3

log = logging.getLogger("shipper")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Pack finished episodes and ship them to the receiver."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in [
        ("run", "the daemon: watch the spool, ship, retry"),
        ("once", "ship everything finished now, then exit (0 shipped, 1 retrying, 3 fatal)"),
        ("status", "show the queue: counts, then each episode not shipped yet"),
        ("retry", "re-queue fatal episodes (after fixing their cause)"),
    ]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--config", type=Path, required=True, help="the shipper's TOML file")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
        if name == "retry":
            sub.add_argument("ids", nargs="*", metavar="ID", help="only these episodes")
            sub.add_argument("--commit", help="only the episodes refused for this commit")
    init = commands.add_parser("init", help="write a shipper config", description="Write a config.")
    init.add_argument("--host-id", required=True)
    init.add_argument("--receiver-url", required=True)
    init.add_argument("--spool-dir", type=Path, required=True)
    init.add_argument("--state-dir", type=Path, required=True)
    init.add_argument("--token-file", type=Path)
    init.add_argument("--settle-seconds", type=float)
    init.add_argument("--concurrency", type=int)
    init.add_argument("--commit-header")
    init.add_argument(
        "--output", type=Path, default=Path("shipper.toml"), help="(never overwritten)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    if args.command == "init":
        sys.exit(_init(args))
    try:
        config = load_config(args.config)
    except ConfigError as error:
        fail(PROG, str(error))
    setup_logging("INFO")
    # httpx logs every request, watchfiles every batch of file events ("N changes
    # detected", several a second while a producer writes): our own lines already
    # say what happened, one per episode event.
    for noisy in ("httpx", "watchfiles"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "status":
        sys.exit(_status(config, as_json=args.json))
    if args.command == "retry":
        sys.exit(_retry(config, args.ids, args.commit))
    sys.exit(_ship(config, once=args.command == "once"))


def _lock_state_dir(config: ShipperConfig, mode: str) -> IO[str]:
    """One shipper per state_dir: a second `run`/`once` would double every upload."""
    try:
        return lockfile.hold(config.state_dir, mode)
    except lockfile.InUse as error:
        fail(PROG, f"state_dir {config.state_dir} is in use by another shipper (pid {error})")


def _open_queue(config: ShipperConfig) -> Queue:
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        return Queue.open(config.state_dir)
    except (OSError, sqlite3.Error, QueueError) as error:
        fail(
            PROG,
            f"{config.source}: state_dir: cannot open the queue in {config.state_dir}: {error}",
        )


def _ship(config: ShipperConfig, *, once: bool) -> int:
    try:
        token = read_token(config)
    except ConfigError as error:
        fail(PROG, str(error))
    if not config.spool_dir.is_dir():
        fail(PROG, f"{config.source}: spool_dir: {config.spool_dir} is not a directory")
    queue = _open_queue(config)
    lock = _lock_state_dir(config, "once" if once else "run")
    progress = None
    if once and sys.stderr.isatty():
        progress = Progress(sys.stderr)
        for handler in logging.getLogger().handlers:
            handler.addFilter(ClearLine(progress))
    try:
        asyncio.run(_serve(config, queue, token, once=once, progress=progress))
        if progress is not None:
            progress.clear()
        counts = queue.counts()
    finally:
        queue.close()
        lock.close()
    waiting = sum(counts[s] for s in (State.PENDING, State.PACKING, State.UPLOADING))
    waiting += counts[State.RETRY_WAIT]
    if not once:
        return 0
    log.info(
        "once: %d shipped, %d waiting for a retry, %d fatal",
        counts[State.SHIPPED],
        waiting,
        counts[State.FATAL],
    )
    if counts[State.FATAL]:
        where = retry_hint_config(config)
        log.info(
            "fatal episodes stay parked; see episode-shipper status --config %s, fix the cause,"
            " then episode-shipper retry --config %s [ID...] [--commit C]",
            where,
            where,
        )
        return EXIT_FATAL
    return EXIT_RETRYING if waiting else EXIT_SHIPPED


async def _serve(
    config: ShipperConfig, queue: Queue, token: str | None, *, once: bool, progress: Progress | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = ReceiverClient(
        config.receiver_url,
        config.host_id,
        commit_header=config.commit_header,
        token=token,
        timeout_seconds=config.request_timeout_seconds,
        max_connections=config.concurrency + 1,
    )
    mode = "once" if once else "run"
    log.info(
        "%s: host %s, spool %s -> %s", mode, config.host_id, config.spool_dir, config.receiver_url
    )
    try:
        await Daemon(config, queue, client, once=once, progress=progress).run(stop)
    finally:
        await client.aclose()
    if stop.is_set():
        log.info("stopped by signal; unfinished work resumes on the next start")


def _status(config: ShipperConfig, *, as_json: bool) -> int:
    path = config.state_dir / "queue.db"
    queue = None
    if path.exists():
        try:
            queue = Queue(connect(path, create=False))
        except (OSError, sqlite3.Error, QueueError) as error:
            fail(PROG, f"{config.source}: state_dir: cannot read the queue {path}: {error}")
    try:
        document = status_document(config, queue)
    finally:
        if queue is not None:
            queue.close()
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(render_text(document), end="")
    return 0


def _retry(config: ShipperConfig, ids: list[str], commit_arg: str | None) -> int:
    commit = None if commit_arg is None else unpadded_commit(commit_arg)
    if commit_arg is not None and commit is None:
        fail(PROG, f"--commit {commit_arg!r}: must be 40 or 64 hex digits")
    queue = _open_queue(config)
    try:
        requeued = queue.retry_fatal(ids, commit)
        missed = {i: queue.get(i) for i in ids if i not in requeued}
    finally:
        queue.close()
    print(f"re-queued {len(requeued)} fatal episode(s); a running shipper picks them up soon")
    for episode_id, episode in missed.items():
        why = "not in the queue" if episode is None else f"{episode.state}, not fatal"
        print(f"{episode_id}: not re-queued ({why})", file=sys.stderr)
    return 1 if missed or (commit is not None and not requeued) else 0


def _init(args: argparse.Namespace) -> int:
    output: Path = args.output
    data: dict[str, Any] = {
        "host_id": args.host_id,
        "receiver_url": args.receiver_url,
        "spool_dir": os.path.abspath(args.spool_dir),
        "state_dir": os.path.abspath(args.state_dir),
    }
    if args.token_file is not None:
        data["token_file"] = os.path.abspath(args.token_file)
    for key in ("settle_seconds", "concurrency", "commit_header"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    try:
        from_mapping(data, str(output), Path(os.path.abspath(output)).parent)
    except ConfigError as error:
        fail(PROG, str(error))
    text = (
        "# episode-shipper configuration, written by `episode-shipper init`.\n"
        "# Every key, with its default, is described in etc/shipper.toml.example.\n"
        + tomli_w.dumps(data)
    )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except FileExistsError:
        fail(PROG, f"{output} already exists; refusing to overwrite it")
    except OSError as error:
        fail(PROG, f"cannot write {output}: {error.strerror}")
    fsync_dir(Path(os.path.abspath(output)).parent)
    print(f"wrote {output}")
    return 0
