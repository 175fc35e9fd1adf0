"""Did an episode directory change after it was packed? Compare it with the pack's manifest.

The manifest is what the packer saw: size and mtime (ns) of every file and
symlink. A newer mtime, another size or a new name means the stored copy lacks
something, so the directory is kept and an operator told.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

Manifest = dict[str, tuple[int, int]]


def encode(manifest: Manifest) -> str:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def decode(text: str) -> Manifest:
    return {name: (int(size), int(mtime)) for name, (size, mtime) in json.loads(text).items()}


def changed_files(root: Path, manifest: Manifest) -> list[str]:
    """Names (relative to root) that are new, resized or newer than at pack time."""
    changed = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            before = manifest.get(relative)
            if before is None or info.st_size != before[0] or info.st_mtime_ns > before[1]:
                changed.append(relative)
    return changed


def summary(files: list[str], limit: int = 10) -> str:
    """'a, b, c and 7 more' for a log line and `status`."""
    shown = ", ".join(files[:limit])
    return shown if len(files) <= limit else f"{shown} and {len(files) - limit} more"
