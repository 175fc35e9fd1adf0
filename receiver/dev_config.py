"""The embedded development config behind `make run`: loopback, data under ./var, the gate
on this checkout, no auth; its remediation texts name the checkout being served."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import msgspec

from receiver.config import GateConfig, ReceiverConfig, from_mapping


def dev_config(project_root: Path, port: int | None = None) -> ReceiverConfig:
    """The embedded config behind `make run`: loopback, data under ./var, gate on this checkout."""
    data = tomllib.loads(DEV_CONFIG_TOML)
    if port is not None:
        data["server"]["port"] = port
    config = from_mapping(data, "<built-in development config>", project_root)
    return msgspec.structs.replace(config, version_gate=_dev_remediation(config.version_gate))


def _dev_remediation(gate: GateConfig) -> GateConfig:
    """Texts naming the checkout this development receiver serves: the code is right here."""
    repo, ref = shlex.quote(str(gate.repo_path)), shlex.quote(gate.ref)
    remediation = f"""\
# Refused by the development receiver, which accepts only the last {gate.window}
# commits of {gate.ref} in the checkout it serves, {gate.repo_path}.
# Make the episode again with the current code; this is the commit to put in
# meta.json and in the {gate.header} header:
git -C {repo} rev-parse {ref}
"""
    unknown = f"""\
# Refused by the development receiver: this commit is not in the history of
# {gate.ref} in the checkout it serves, {gate.repo_path}
# (uncommitted there, on another branch, or rewritten). Commit or check out the
# code there, then use the commit this prints:
git -C {repo} status --short --branch
git -C {repo} rev-parse {ref}
"""
    return msgspec.structs.replace(gate, remediation=remediation, remediation_unknown=unknown)


DEV_CONFIG_TOML = """
[server]
host = "127.0.0.1"
port = 8080

[storage]
data_dir = "var"
max_upload_bytes = 8589934592
min_free_bytes = 268435456
validate = "tar"

[version_gate]
enabled = true
repo_path = "."
ref = "HEAD"
window = 50
refresh_seconds = 10

[auth]
mode = "none"
"""
