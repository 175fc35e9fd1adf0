"""Load a TOML file into a frozen, typed msgspec Struct.

Every failure becomes one ConfigError naming the file, the key and what was
expected, so that a CLI can print a single line and exit 2.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; str() is the one line to show."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


_AT_PATH = re.compile(r"^(?P<msg>.*?) - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_EXPECTED = re.compile(r"^Expected `(?P<what>[^`]+)`(?P<rest>.*?)(, got `(?P<got>[^`]+)`)?$")


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


_ENUM = re.compile(r"^Invalid enum value (?P<got>.*)$")


def explain_validation_error(
    source: str, error: msgspec.ValidationError, root: type | None = None
) -> ConfigError:
    """Turn msgspec's message into (key, problem) in the words of a config file."""
    text = str(error)
    path = ""
    match = _AT_PATH.match(text)
    if match:
        text = match.group("msg")
        # msgspec paths look like ".storage.data_dir" or ".hosts[0]"
        path = match.group("path").lstrip(".")
    if m := _UNKNOWN.match(text):
        field = m.group("field")
        return ConfigError(source, _join(path, field), "unknown key" + _suggest(root, path, field))
    if m := _MISSING.match(text):
        return ConfigError(source, _join(path, m.group("field")), "required key is missing")
    if (m := _ENUM.match(text)) and root is not None and path:
        choices = _field_choices(root, path)
        if choices:
            listed = ", ".join(f'"{choice}"' for choice in choices)
            return ConfigError(source, path, f"expected one of {listed}, got {m.group('got')}")
    if m := _EXPECTED.match(text):
        what = _TYPE_WORDS.get(m.group("what"), m.group("what"))
        problem = f"expected {what}{m.group('rest')}"
        if m.group("got"):
            problem += f", got {_TYPE_WORDS.get(m.group('got'), m.group('got'))}"
        return ConfigError(source, path or None, problem)
    return ConfigError(source, path or None, text[:1].lower() + text[1:])


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "a table",
    "array": "an array",
    "null": "nothing",
}


def decode_hook(type_: type, obj: Any) -> Any:
    if type_ is Path:
        if isinstance(obj, str):
            return Path(obj)
        raise TypeError("expected a string (a path)")
    raise NotImplementedError


def encode_hook(obj: Any) -> Any:
    """Lets msgspec.json.encode write Paths (used to hand a config to worker processes)."""
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError


def _suggest(root: type | None, path: str, field: str) -> str:
    """'; did you mean X?' for a misspelt key or section (e.g. [versiongate])."""
    node: Any = root
    for part in path.split(".") if path else []:
        node = _hint(node, part)
    try:
        names = [f.encode_name for f in msgspec.structs.fields(node)]
    except TypeError:
        return ""
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _hint(node: Any, part: str) -> Any:
    try:
        hint = typing.get_type_hints(node, include_extras=True).get(part)
    except TypeError:
        return None
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _member_hint(node: Any, part: str) -> Any:
    """The type hint of field `part` of a Struct type, or of the first in a union that has it."""
    members = typing.get_args(node) if isinstance(node, types.UnionType) else (node,)
    for member in members:
        try:
            hints = typing.get_type_hints(member, include_extras=True)
        except TypeError:
            continue
        if part in hints:
            return hints[part]
    return None


def _field_choices(root: type, dotted: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal-typed field, found by walking the Struct types."""
    node: Any = root
    for part in dotted.split("."):
        node = _member_hint(node, part)
        if node is None:
            return None
        while typing.get_origin(node) is Annotated:
            node = typing.get_args(node)[0]
    if typing.get_origin(node) is Literal:
        return tuple(str(arg) for arg in typing.get_args(node))
    return None


def convert(source: str, data: Mapping[str, Any], type_: type[T]) -> T:
    """Validate already-parsed TOML data against a Struct type."""
    try:
        return msgspec.convert(data, type=type_, dec_hook=decode_hook)
    except msgspec.ValidationError as error:
        raise explain_validation_error(source, error, type_) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable files and syntax errors become ConfigError."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, None, "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a config file") from None
    except OSError as error:
        raise ConfigError(source, None, f"cannot read config file: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(source, None, f"not UTF-8 text (byte {error.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib's message already carries "(at line N, column M)"
        raise ConfigError(source, None, f"invalid TOML: {error}") from None


def load(path: Path, type_: type[T]) -> T:
    """Read and validate a TOML config file."""
    return convert(str(path), read_toml(path), type_)


def resolve_path(base: Path, value: Path) -> Path:
    """Relative paths in a config file are relative to the file's directory."""
    expanded = value.expanduser()
    return expanded if expanded.is_absolute() else (base / expanded)
