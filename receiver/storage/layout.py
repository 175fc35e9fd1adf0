"""Where everything lives under a receiver's data_dir: the one place that spells these paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "index.jsonl"


@dataclass(frozen=True)
class DataDirLayout:
    data_dir: Path

    @property
    def episodes_dir(self) -> Path:
        return self.data_dir / "episodes"

    @property
    def tmp_dir(self) -> Path:
        """Uploads in progress; on the same file system as episodes/, never under it."""
        return self.data_dir / "tmp"

    @property
    def index_path(self) -> Path:
        return self.data_dir / INDEX_NAME

    @property
    def claims_path(self) -> Path:
        """The per-episode lock file shared by receiver workers and episode-backfill."""
        return self.data_dir / "episodes.lock"

    @property
    def instance_lock_path(self) -> Path:
        """Held by the one receiver serving this data_dir."""
        return self.data_dir / "receiver.lock"
