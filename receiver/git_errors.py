"""git's own words for a failure: its first line in full, and the fix when we know one.

Shared by the gate (log lines, `last_error`) and `check-config`, so an operator
reads the same cause in both. git must run with LC_ALL=C for the match to work.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex

_DUBIOUS = re.compile(r"detected dubious ownership in repository at '(?P<path>[^\n]+)'")


def first_line(stderr: str) -> str:
    """git's first non-empty line, never shortened; its advice follows on later lines."""
    for line in stderr.splitlines():
        if line.strip():
            return line.strip()
    return "(git printed nothing on stderr)"


def safe_directory_fix(stderr: str) -> str | None:
    """For "dubious ownership": the command that lets this process's user read the checkout.

    git's own advice says `--global`, which writes the config of whoever runs it (an
    operator), not of the service user the receiver runs as; `--system` covers every user.
    """
    match = _DUBIOUS.search(stderr)
    if match is None:
        return None
    command = f"git config --system --add safe.directory {shlex.quote(match['path'])}"
    return (
        f"the checkout belongs to another user than this process's ({_user()}); "
        f"if that is intended, run as root: {command}"
    )


def describe(stderr: str) -> str:
    """One line for logs and check-config: git's first line, plus the fix when known."""
    line = first_line(stderr)
    fix = safe_directory_fix(stderr)
    return line if fix is None else f"{line}; {fix}"


def _user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
