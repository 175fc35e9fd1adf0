"""The shipper's config: defaults, invalid keys, relative paths, the documented example."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from episode_common.config_loading import ConfigError
from shipper.config import ShipperConfig, from_mapping, load_config
from tests.support import PROJECT_ROOT

EXAMPLE = PROJECT_ROOT / "etc" / "shipper.toml.example"


def keys_of(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(struct):
        if field.name == "source":
            continue
        if isinstance(field.default, msgspec.Struct):
            keys |= keys_of(type(field.default), f"{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


def test_the_example_config_loads_with_its_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.commit_header == "X-Code-Commit"
    assert config.retry.max_seconds == 600.0 and config.retention.delete_after_days == 7.0


def test_the_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    documented = set()
    section = ""
    for line in text.splitlines():
        if match := re.match(r"^\[(\w+)\]", line):
            section = match.group(1) + "."
        elif match := re.match(r"^#?\s?(\w+) = ", line):
            documented.add(section + match.group(1))
    assert keys_of(ShipperConfig) <= documented, keys_of(ShipperConfig) - documented


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "host_id": "lab-1",
        "receiver_url": "http://r:8080/",
        "spool_dir": "spool",
        "state_dir": "state",
    }
    data.update(overrides)
    return data


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = from_mapping(base(token_file="token"), "x.toml", tmp_path)
    assert config.spool_dir == tmp_path / "spool" and config.token_file == tmp_path / "token"
    assert config.receiver_url == "http://r:8080"


def test_state_dir_inside_spool_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="state_dir: must not be inside spool_dir"):
        from_mapping(base(state_dir="spool/.state"), "x.toml", tmp_path)


def test_max_backoff_below_base_is_refused(tmp_path: Path) -> None:
    retry = {"base_seconds": 10, "max_seconds": 1}
    with pytest.raises(ConfigError, match=r"retry\.max_seconds"):
        from_mapping(base(retry=retry), "x.toml", tmp_path)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"zstd_level": 23}, "zstd_level"),
        ({"shutdown_grace_seconds": -1}, "shutdown_grace_seconds"),
        ({"retention": {"delete_after_days": "never"}}, "retention.delete_after_days"),
        ({"commit_header": "X Code"}, "commit_header"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(base(**overrides), "x.toml", tmp_path)
    assert error.value.key == key and "x.toml" in str(error.value)


MINIMAL = (
    'host_id = "lab-01"\nreceiver_url = "http://127.0.0.1:8080/"\n'
    'spool_dir = "spool"\nstate_dir = "state"\n'
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shipper.toml"
    path.write_text(text)
    return path


def test_minimal_shipper_config_has_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.receiver_url == "http://127.0.0.1:8080"
    assert config.spool_dir == tmp_path.resolve() / "spool"
    assert config.token_file is None
    assert config.commit_header == "X-Code-Commit"
    assert config.retry.base_seconds == 1.0
    assert config.retention.delete_after_days == 7.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL.replace("lab-01", "../etc"), "host_id"),
        (MINIMAL.replace("http://127.0.0.1:8080/", "ftp://x"), "receiver_url"),
        (MINIMAL + "concurrency = 0\n", "concurrency"),
        (MINIMAL + "[retry]\nbase_seconds = 5\nmax_seconds = 1\n", "retry.max_seconds"),
        (MINIMAL + "[retention]\nkeep = 1\n", "retention.keep"),
        (MINIMAL.replace('state_dir = "state"\n', ""), "state_dir"),
    ],
)
def test_invalid_shipper_configs_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key


def test_a_receiver_url_without_its_scheme_says_what_it_must_start_with(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping(base(receiver_url="receiver.lab:8080"), "x.toml", tmp_path)
    assert caught.value.key == "receiver_url"
    assert caught.value.problem == (
        "must start with http:// or https:// and name a host, got 'receiver.lab:8080'"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "[retension]\ndelete_after_days = 1\n", "did you mean 'retention'?"),
        (MINIMAL + "[retry]\nmax_second = 1\n", "retry.max_second: unknown key; did you mean"),
        (MINIMAL + "setle_seconds = 1\n", "did you mean 'settle_seconds'?"),
    ],
)
def test_an_unknown_key_or_section_suggests_the_closest_known_one(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


def test_an_unknown_key_far_from_every_known_one_suggests_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL + "[versiongate]\nwindow = 5\n"))
    assert caught.value.problem == "unknown key"
