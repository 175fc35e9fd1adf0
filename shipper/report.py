"""`episode-shipper status`: the queue as a JSON document and as text for a terminal.

The text form prints each distinct remediation block once and unindented, so
an operator can copy it into the host's shell as the receiver wrote it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipper import inflight, lockfile
from shipper.config import ShipperConfig
from shipper.queue import Queue
from shipper.spool import unqueued
from shipper.states import Episode, State


def _iso(at: float | None) -> str | None:
    if at is None or at <= 0:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _upload(item: dict[str, Any] | None) -> dict[str, Any] | None:
    if item is None:
        return None
    rate, eta = inflight.rate_and_eta(item)
    return {
        "sent_bytes": item["sent_bytes"],
        "size_bytes": item["size_bytes"],
        "bytes_per_second": None if rate is None else round(rate),
        "eta_seconds": None if eta is None else round(eta),
        "recorded_at": _iso(item["updated_at"]),
        "text": inflight.describe(item),
    }


def _episode(episode: Episode, upload: dict[str, Any] | None = None) -> dict[str, Any]:
    waiting = episode.state is State.RETRY_WAIT
    uploading = episode.state is State.UPLOADING
    return {
        "upload": _upload(upload) if uploading else None,
        "episode_id": episode.episode_id,
        "state": str(episode.state),
        "kind": str(episode.kind),
        "source": str(episode.source),
        "commit": episode.commit,
        "size_bytes": episode.size_bytes,
        "attempts": episode.attempts,
        "next_attempt_at": _iso(episode.next_attempt_at) if waiting else None,
        "reason": episode.last_error,
        "remediation": episode.remediation,
    }


def retry_hint_config(config: ShipperConfig) -> str:
    """The config path as `retry --config` needs it, from whatever directory it is run."""
    return str(Path(config.source).resolve()) if config.source != "<built-in>" else config.source


def _daemon(config: ShipperConfig) -> dict[str, Any]:
    holder = lockfile.holder(config.state_dir)
    if holder is None:
        return {"running": False, "pid": None, "mode": None, "since": None}
    return {"running": True, "pid": holder.pid, "mode": holder.mode, "since": _iso(holder.since)}


def status_document(config: ShipperConfig, queue: Queue | None) -> dict[str, Any]:
    """Everything `status --json` prints; queue is None before the first run."""
    counts = dict.fromkeys((str(state) for state in State), 0)
    document: dict[str, Any] = {
        "host_id": config.host_id,
        "config": retry_hint_config(config),
        "receiver_url": config.receiver_url,
        "state_dir": str(config.state_dir),
        "daemon": _daemon(config),
        "spool": {"finished_not_queued": 0, "settling": 0},
        "counts": counts,
        "receiver": None,
        "refused_commits": [],
        "episodes": [],
        "changed_after_packing": [],
    }
    known = set() if queue is None else set(queue.known_sources())
    finished, settling = unqueued(config.spool_dir, known, config.settle_seconds, time.time())
    document["spool"] = {"finished_not_queued": finished, "settling": settling}
    if queue is None:
        return document
    counts.update({str(state): n for state, n in queue.counts().items()})
    receiver = queue.receiver()
    if receiver is not None:
        document["receiver"] = {
            "consecutive_failures": receiver.failures,
            "next_try_at": _iso(receiver.next_try) if receiver.failures else None,
            "last_error": receiver.last_error,
        }
    document["refused_commits"] = [
        {"commit": r.commit, "reason": r.reason, "remediation": r.remediation}
        for r in queue.refusals()
    ]
    document["changed_after_packing"] = [
        {"episode_id": e.episode_id, "source": str(e.source), "files": e.changed_files}
        for e in queue.changed_episodes()
    ]
    uploads = inflight.read(config.state_dir)
    document["episodes"] = [_episode(e, uploads.get(e.episode_id)) for e in queue.unshipped()]
    return document


def _when(iso: str | None, now: float) -> str:
    if iso is None:
        return "-"
    delta = datetime.fromisoformat(iso).timestamp() - now
    return f"{iso} ({'now' if delta <= 0 else f'in {delta:.0f} s'})"


def _reason_text(episode: dict[str, Any]) -> str:
    if episode["upload"] is not None:
        return f"sent {episode['upload']['text']}"
    return str(episode["reason"] or "-")


def _daemon_line(document: dict[str, Any]) -> str:
    daemon = document["daemon"]
    if daemon["running"]:
        since = f" since {daemon['since']}" if daemon["since"] else ""
        return f"daemon: running ({daemon['mode'] or '?'}, pid {daemon['pid'] or '?'}){since}"
    return (
        "daemon: not running; nothing is shipped until"
        f" `episode-shipper run --config {document['config']}` (or its service) starts"
    )


def render_text(document: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    counts = document["counts"]
    lines = [
        f"host {document['host_id']} -> {document['receiver_url']}",
        "queue: " + ", ".join(f"{counts[str(state)]} {state}" for state in State),
    ]
    lines.append(_daemon_line(document))
    spool = document["spool"]
    if spool["finished_not_queued"] or spool["settling"]:
        lines.append(
            f"spool: {spool['finished_not_queued']} finished entry(ies) not queued yet,"
            f" {spool['settling']} still settling (settle_seconds)"
        )
    receiver = document["receiver"]
    if receiver and str(receiver["last_error"]).startswith("held:"):
        lines.append(
            f"receiver: refuses our token, uploads {receiver['last_error']}; token_file is"
            f" re-read before the next try {_when(receiver['next_try_at'], now)}"
        )
    elif receiver and receiver["consecutive_failures"]:
        lines.append(
            f"receiver: unavailable ({receiver['last_error']}), "
            f"{receiver['consecutive_failures']} failure(s) in a row, "
            f"next try {_when(receiver['next_try_at'], now)}"
        )
    for changed in document["changed_after_packing"]:
        lines.append(
            f"changed after packing (kept, never deleted; the receiver has the packed copy):"
            f" {changed['episode_id']} ({changed['source']}): {changed['files']}"
        )
    episodes = document["episodes"]
    if not episodes:
        if not (spool["finished_not_queued"] or spool["settling"]):
            lines.append("nothing waiting: every episode in the queue and the spool is shipped")
        return "\n".join(lines) + "\n"
    lines += _episode_lines(episodes, now)
    if counts[str(State.FATAL)]:
        lines += [
            "",
            "Fatal episodes stay parked; after fixing the cause:",
            f"  episode-shipper retry --config {document['config']} [ID...] [--commit C]",
        ]
    return "\n".join(lines) + "\n"


def _episode_lines(episodes: list[dict[str, Any]], now: float) -> list[str]:
    """The table of episodes not shipped yet, then each remediation once with its ids."""
    lines: list[str] = []
    rows = [("EPISODE", "STATE", "ATTEMPTS", "NEXT TRY", "REASON")]
    for episode in episodes:
        rows.append(
            (
                episode["episode_id"],
                episode["state"],
                str(episode["attempts"]),
                _when(episode["next_attempt_at"], now),
                _reason_text(episode),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines.append("")
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    remediations: dict[str, list[str]] = {}
    for episode in episodes:
        if episode["remediation"]:
            remediations.setdefault(episode["remediation"], []).append(episode["episode_id"])
    for text, ids in remediations.items():
        lines += ["", f"Remediation from the receiver for {', '.join(ids)}:", text.rstrip("\n")]
    return lines
