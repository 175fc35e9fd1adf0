"""What every command line here shares: one-line fatal errors and log setup."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

EXIT_USAGE = 2


def fail(program: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit; used for bad usage and bad configuration."""
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def setup_logging(level: str = "INFO") -> None:
    """One line per event, as journald shows it best."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
