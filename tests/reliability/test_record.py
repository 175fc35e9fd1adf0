"""docs/reliability.md stays true: every test it names exists."""

from __future__ import annotations

import ast
import re

from tests.support import PROJECT_ROOT

RECORD = PROJECT_ROOT / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def test_every_test_named_in_the_reliability_record_exists() -> None:
    references = REFERENCE.findall(RECORD.read_text())
    assert len(references) > 40
    missing = []
    for path, name in sorted(set(references)):
        source = PROJECT_ROOT / path
        tree = ast.parse(source.read_text()) if source.exists() else ast.Module([], [])
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in functions:
            missing.append(f"{path}::{name}")
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_reliability_test_is_in_the_record() -> None:
    named = {name for _, name in REFERENCE.findall(RECORD.read_text())}
    for source in sorted((PROJECT_ROOT / "tests" / "reliability").glob("test_*.py")):
        if source.name == "test_record.py":
            continue
        tree = ast.parse(source.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if node.name.startswith(("test_every_failpoint", "test_unknown_failpoint")):
                    continue  # checks of the test machinery itself
                assert node.name in named, f"{source.name}::{node.name} is not in the record"
