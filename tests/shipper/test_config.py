"""The shipper's config layer: defaults, invalid keys, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from episode_common.config_loading import ConfigError
from shipper.config import load_config

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
