"""`episode-shipper`: run, once, status, retry, init."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from episode_common.cli_support import fail
from shipper import __version__

PROG = "episode-shipper"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Pack finished episodes and ship them to the receiver."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in [
        ("run", "the daemon: watch the spool, ship, retry"),
        ("once", "ship everything finished now, then exit"),
        ("status", "show the queue"),
        ("retry", "re-queue fatal episodes"),
    ]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, required=True)
        if name == "status":
            sub.add_argument("--json", action="store_true")
    commands.add_parser("init", help="write a shipper config")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    fail(PROG, f"'{args.command}' is not available in this version yet")
    sys.exit(2)
