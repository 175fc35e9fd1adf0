"""`episode-verify`: audit the store against the index."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from episode_common.cli_support import fail

PROG = "episode-verify"
DESCRIPTION = "Audit the store against the index."


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.parse_args(argv)
    fail(PROG, "not available in this version yet")
