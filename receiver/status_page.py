"""The operator's status page: one self-contained HTML document (inline CSS, no script, no
external resources), so it works offline and from a phone on the lab network.

Per-host and per-commit totals come from the catalogue's summaries; STALE marks and recent
rejections from Telemetry's keeper (the catalogue: every worker's, kept across restarts).
Blocking: render it in a thread. Every value that reaches the page is HTML-escaped:
rejection events carry whatever a client sent.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable

from receiver.gate import warning_threshold
from receiver.status_commits import COMMIT_CSS, commit_lines, render_commits
from receiver.storage import CommitSummary, HostSummary
from receiver.telemetry import Telemetry

SHORT = 10  # characters of a commit id shown; the full id is in the title attribute


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    if seconds < -5:
        return "in the future (clock skew?)"
    if seconds < 1:
        return "just now"
    for limit, unit, divisor in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // divisor)} {unit} ago"
    return f"{int(seconds // 86400)} d ago"


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _parse_wall(value: str) -> float | None:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _commit(commit: object) -> str:
    if not isinstance(commit, str) or not commit:
        return '<span class="muted">unknown</span>'
    return f'<code title="{_e(commit)}">{_e(commit[:SHORT])}</code>'


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return '<span class="muted">never</span>'
    iso = _iso(timestamp)
    return f'{_e(human_age(now - timestamp))}<br><small class="muted">{_e(iso)}</small>'


def _behind(
    commit: str | None, positions: Callable[[str], int | None], gate: dict[str, object]
) -> str:
    if commit is None:
        return '<span class="muted">—</span>'
    if not gate.get("enabled"):
        return '<span class="muted">gate off</span>'
    if not gate.get("loaded"):
        return '<span class="muted">gate not loaded</span>'
    behind = positions(commit)
    window = gate.get("window")
    if behind is None:
        why = "older than the window, or not on the gate's ref: its next upload will be refused"
        return f'<span class="bad" title="{why}">outside window</span>'
    if behind == 0:
        return '<span class="good">at head</span>'
    text = f"{behind} behind"
    if isinstance(window, int) and behind >= warning_threshold(window):
        return f'<span class="warn" title="refused once {window} or more behind">{text}</span>'
    return text


def _badge(mark: dict[str, object] | None, now: float) -> str:
    """OK, or STALE (refused as stale/unknown recently) with the refusal spelled out under it."""
    if mark is None:
        return '<span class="badge ok">OK</span>'
    at = float(mark["at"])  # type: ignore[arg-type]
    behind = mark.get("behind_by")
    commit = mark.get("commit")
    short = commit[:SHORT] if isinstance(commit, str) else "unknown"
    seen = f"{mark['refusals']} refusal(s)"
    detail = f"{mark['reason']} {human_age(now - at)}"
    why = f"refused as {mark['reason']} at {_iso(at)}: commit {commit}"
    if behind is not None:
        detail += f", {behind} behind"
        why += f", {behind} commits behind the gate head"
    line = f'<br><small class="why">{_e(detail)} · <code>{_e(short)}</code></small>'
    if mark.get("accepted_since") is not None:
        why += f"; {seen}; a newer upload was accepted since, refused episodes stay parked"
        return f'<span class="badge was" title="{_e(why)}">WAS STALE</span>{line}'
    why += f"; {seen}; update this host's code"
    return f'<span class="badge stale" title="{_e(why)}">STALE</span>{line}'


def _gate_banner(gate: dict[str, object]) -> str:
    if not gate.get("enabled"):
        return (
            '<div class="banner warn" id="gate-banner">Version gate is OFF: every commit is '
            "accepted (emergency collect mode).</div>"
        )
    if not gate.get("loaded"):
        error = gate.get("last_error") or "no refresh has finished yet"
        return (
            '<div class="banner bad" id="gate-banner">The version gate has never loaded a '
            f"window: every upload is answered 503. Last error: {_e(error)}</div>"
        )
    if gate.get("last_error"):
        return (
            '<div class="banner bad" id="gate-banner">The last gate refresh failed; the previous '
            f"window is kept. Error: {_e(gate['last_error'])} "
            f"({_e(gate.get('refresh_failures'))} failed of {_e(gate.get('refreshes'))})</div>"
        )
    return ""


def _card(label: str, value_html: str, card_id: str, *, alert: bool = False) -> str:
    """label is trusted text; value_html must already be escaped."""
    css = "card alert" if alert else "card"
    return (
        f'<div class="{css}" id="{card_id}"><div class="label">{label}</div>'
        f'<div class="value">{value_html}</div></div>'
    )


def _gate_cards(gate: dict[str, object]) -> str:
    age = gate.get("last_refresh_age_seconds")
    age_text = human_age(float(age)) if isinstance(age, int | float) else "never"
    trouble = bool(gate.get("enabled")) and (not gate.get("loaded") or bool(gate.get("last_error")))
    window = f"{_e(gate.get('window_size'))} of {_e(gate.get('window'))}"
    return (
        _card(f"Gate head ({_e(gate.get('ref'))})", _commit(gate.get("head_commit")), "gate-head")
        + _card("Last good refresh", _e(age_text), "gate-age", alert=trouble)
        + _card("Window (commits)", window, "gate-window")
    )


def _host_rows(
    names: list[str],
    hosts: dict[str, HostSummary],
    stale: dict[str, dict[str, object]],
    gate_positions: Callable[[str], int | None],
    gate_state: dict[str, object],
    now: float,
) -> list[str]:
    rows = []
    for name in names:
        summary = hosts.get(name, HostSummary())
        mark = stale.get(name)
        seen = _parse_wall(summary.last_seen) if summary.last_seen else None
        stale_attr = "stale" if mark and mark.get("accepted_since") is None else "ok"
        rows.append(
            f'<tr data-host="{_e(name)}" data-state="{stale_attr}">'
            f'<th scope="row">{_e(name)}</th><td>{_badge(mark, now)}</td>'
            f'<td class="num">{summary.episodes}</td>'
            f'<td class="num" title="{summary.bytes} bytes">{_e(human_bytes(summary.bytes))}</td>'
            f"<td>{_when(seen, now)}</td><td>{_commit(summary.last_commit) if seen else ''}</td>"
            f"<td>{_behind(summary.last_commit, gate_positions, gate_state) if seen else ''}</td>"
            "</tr>"
        )
    return rows or ['<tr><td colspan="7" class="muted">No episodes received yet.</td></tr>']


def _rejection_rows(rejections: list[dict[str, object]], now: float) -> list[str]:
    rows = []
    for item in rejections:
        at = float(item["time"])  # type: ignore[arg-type]
        behind = item.get("behind_by")
        rows.append(
            f'<tr data-reason="{_e(item["outcome"])}">'
            f"<td>{_when(at, now)}</td><td>{_e(item['host'])}</td><td>{_e(item['episode'])}</td>"
            f'<td><span class="reason">{_e(item["outcome"])}</span> '
            f'<small class="muted">{_e(item["method"])} {_e(item["status"])}</small></td>'
            f"<td>{_commit(item.get('commit'))}"
            f"{f' <small class=muted>{_e(behind)} behind</small>' if behind is not None else ''}"
            "</td></tr>"
        )
    return rows or ['<tr><td colspan="5" class="muted">No rejections.</td></tr>']


def render_status_page(
    *,
    hosts: dict[str, HostSummary],
    gate_state: dict[str, object],
    gate_positions: Callable[[str], int | None],
    telemetry: Telemetry,
    now: float,
    version: str,
    commits: dict[str | None, CommitSummary] | None = None,
) -> str:
    stale = telemetry.stale_hosts(now=now)
    names = sorted(set(hosts) | set(stale))
    total_eps = sum(h.episodes for h in hosts.values())
    total_bytes = sum(h.bytes for h in hosts.values())
    stale_now = sum(1 for m in stale.values() if m.get("accepted_since") is None)
    host_rows = _host_rows(names, hosts, stale, gate_positions, gate_state, now)
    rejections = telemetry.recent_rejections(now=now)
    rejection_rows = _rejection_rows(rejections, now)
    cards = (
        _gate_cards(gate_state)
        + _card("Hosts", str(len(names)), "total-hosts")
        + _card("Episodes", str(total_eps), "total-episodes")
        + _card("Stored", _e(human_bytes(total_bytes)), "total-bytes")
        + _card("Stale hosts", str(stale_now), "stale-count", alert=stale_now > 0)
    )
    by_commit = render_commits(commit_lines(commits or {}, gate_positions, gate_state), human_bytes)
    return _TEMPLATE.format(
        css=_CSS + COMMIT_CSS,
        commits=by_commit,
        version=_e(version),
        generated=_e(_iso(now)),
        banner=_gate_banner(gate_state),
        cards=cards,
        hosts="".join(host_rows),
        rejections="".join(rejection_rows),
        rejection_count=len(rejections),
        pid=telemetry.pid,
        started=_e(human_age(now - telemetry.started_at)),
    )


_CSS = """
:root{--bad:#b42318;--bad-bg:#fef3f2;--warn:#b54708;--warn-bg:#fffaeb;--good:#067647;
--muted:#667085;--line:#e4e7ec;--ink:#101828}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--ink);background:#f8f9fb}
header{background:#1d2939;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:16px}
header h1{font-size:20px;margin:0}header .meta{color:#d0d5dd;font-size:13px;margin-left:auto}
main{padding:18px 28px 32px;max-width:1400px}
h2{font-size:17px;margin:26px 0 8px}
.banner{padding:12px 16px;border-radius:8px;margin:0 0 14px;font-weight:600}
.banner.bad{background:var(--bad-bg);color:var(--bad);border:1px solid #fda29b}
.banner.warn{background:var(--warn-bg);color:var(--warn);border:1px solid #fec84b}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 16px;
min-width:150px}
.card.alert{border-color:var(--bad);background:var(--bad-bg)}
.card.alert .value{color:var(--bad)}
.label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.value{font-size:22px;font-weight:650}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid var(--line);
border-radius:8px;overflow:hidden}
th,td{text-align:left;padding:8px 12px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{background:#f2f4f7;font-size:12px;text-transform:uppercase;letter-spacing:.04em;
color:#475467}
tbody th{font-weight:600}
tr[data-state=stale]{background:var(--bad-bg)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:13px ui-monospace,"DejaVu Sans Mono",monospace;background:#f2f4f7;padding:1px 5px;
border-radius:4px}
small{font-size:12px}.muted{color:var(--muted)}
.good{color:var(--good);font-weight:600}.warn{color:var(--warn);font-weight:600}
.bad{color:var(--bad);font-weight:600}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:700;
letter-spacing:.05em}
.badge.ok{background:#ecfdf3;color:var(--good)}
.badge.stale{background:var(--bad);color:#fff}
.badge.was{background:var(--warn-bg);color:var(--warn);border:1px solid #fec84b}
.reason{font-weight:600;color:var(--bad)}
.why{color:var(--bad)}
.card code{font-size:20px;font-weight:650;background:none;padding:0}
footer{color:var(--muted);font-size:12px;margin-top:22px}
"""

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>episode-ingest receiver</title><style>{css}</style></head>
<body><header><h1>episode-ingest receiver</h1>
<span class="meta">version {version} · generated {generated} · refreshes every 10 s</span></header>
<main>{banner}<section class="cards" id="summary">{cards}</section>
<h2>Hosts</h2>
<table id="hosts"><thead><tr><th>Host</th><th>Status</th><th class="num">Episodes</th>
<th class="num">Bytes</th>
<th>Last episode</th><th>Last commit</th><th>Behind head</th></tr></thead>
<tbody>{hosts}</tbody></table>
<h2>Dataset by commit <small class="muted">(episodes; green in the window, orange near
its edge, red outside it)</small></h2>
<section id="dataset-by-commit">{commits}</section>
<h2>Recent rejections <small class="muted">({rejection_count}, newest first)</small></h2>
<table id="rejections"><thead><tr><th>When</th><th>Host</th><th>Episode</th><th>Reason</th>
<th>Commit</th></tr></thead><tbody>{rejections}</tbody></table>
<footer>Episodes, bytes, commits, STALE marks and rejections come from the shared
catalogue (every worker's, kept across restarts for 24 h). Answered by pid {pid}, started
{started}.</footer>
</main></body></html>
"""
