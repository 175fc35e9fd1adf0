"""The s3 backend's local journal: what each upload may leave in the bucket if we crash.

One JSON line per event, appended with O_APPEND in one write (atomic between the worker
processes) and fsynced before the bucket is touched, so that after a crash start-up knows
every multipart upload and helper object an earlier run started and can clean them up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from episode_common.durable import atomic_write


@dataclass
class Attempt:
    """One upload's notes: who it was, and what it created in the bucket."""

    token: str
    host_id: str
    episode_id: str
    commit: str | None
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (key, multipart upload id)
    objects: list[str] = field(default_factory=list)  # helper objects: marker, staging

    def begin_line(self) -> dict[str, object]:
        return {
            "op": "begin",
            "token": self.token,
            "host_id": self.host_id,
            "episode_id": self.episode_id,
            "commit": self.commit,
        }


class UploadJournal:
    """Append-only notes under data_dir; read and compacted once, at start."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def begin(self, attempt: Attempt) -> None:
        self._append(attempt.begin_line(), sync=True)

    def upload(self, token: str, key: str, upload_id: str) -> None:
        self._append({"op": "upload", "token": token, "key": key, "upload_id": upload_id})

    def created(self, token: str, key: str) -> None:
        self._append({"op": "object", "token": token, "key": key})

    def end(self, token: str) -> None:
        # Not fsynced: a lost end only makes the next start check this attempt again.
        self._append({"op": "end", "token": token}, sync=False)

    def unfinished(self) -> list[Attempt]:
        """Attempts begun and not ended, in the order they began (a torn last line ignored)."""
        attempts: dict[str, Attempt] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                note = json.loads(line)
            except ValueError:
                continue  # a torn last line: its bucket call never started
            _apply(attempts, note)
        return list(attempts.values())

    def rewrite(self, attempts: list[Attempt]) -> None:
        """Keep only these attempts' notes (atomically, durably)."""
        lines = []
        for attempt in attempts:
            lines.append(attempt.begin_line())
            lines += [
                {"op": "upload", "token": attempt.token, "key": k, "upload_id": u}
                for k, u in attempt.uploads
            ]
            lines += [{"op": "object", "token": attempt.token, "key": k} for k in attempt.objects]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        atomic_write(self.path, data, mode=0o600)

    def _append(self, note: dict[str, object], sync: bool = True) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps(note) + "\n").encode())
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _apply(attempts: dict[str, Attempt], note: dict[str, object]) -> None:
    token = str(note.get("token"))
    op = note.get("op")
    if op == "begin":
        commit = note.get("commit")
        attempts[token] = Attempt(
            token,
            str(note["host_id"]),
            str(note["episode_id"]),
            commit if isinstance(commit, str) else None,
        )
    elif token in attempts and op == "upload":
        attempts[token].uploads.append((str(note["key"]), str(note["upload_id"])))
    elif token in attempts and op == "object":
        attempts[token].objects.append(str(note["key"]))
    elif op == "end":
        attempts.pop(token, None)
