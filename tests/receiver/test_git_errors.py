"""receiver.git_errors: git's first line in full, and the safe.directory fix."""

from __future__ import annotations

import shlex

from receiver.git_errors import describe, first_line, safe_directory_fix

# What git 2.39 prints for a checkout owned by another user.
DUBIOUS = (
    "fatal: detected dubious ownership in repository at '{path}'\n"
    "To add an exception for this directory, call:\n"
    "\n"
    "\tgit config --global --add safe.directory {path}\n"
)


def test_the_first_line_is_kept_whole_however_long() -> None:
    line = "fatal: " + "word " * 100 + "end"
    assert describe(f"\n  {line}  \nhint: more\n") == line


def test_no_stderr_says_so() -> None:
    assert first_line("") == first_line(" \n\n") == "(git printed nothing on stderr)"


def test_other_failures_get_no_fix() -> None:
    assert safe_directory_fix("fatal: not a git repository (or any parent): .git\n") is None


def test_dubious_ownership_gets_the_system_wide_command_for_the_reported_path() -> None:
    path = "/srv/lab's code/episode-tools"
    described = describe(DUBIOUS.format(path=path))
    line, _, fix = described.partition("; ")
    assert line == f"fatal: detected dubious ownership in repository at '{path}'"
    command = fix.partition("run as root: ")[2]
    assert shlex.split(command) == ["git", "config", "--system", "--add", "safe.directory", path]
    assert "\n" not in described
