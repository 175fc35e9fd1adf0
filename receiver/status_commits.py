"""The status page's "dataset by commit" section: episodes and bytes per commit, with how far
each commit is behind the gate head, as an inline SVG bar chart and a table (no script, no
external assets). Every value is HTML-escaped; the section is bounded (MAX_COMMITS bars).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

from receiver.gate import warning_threshold
from receiver.storage import CommitSummary

MAX_COMMITS = 30  # bars drawn; the rest are summed into one "other commits" bar
SHORT = 10
BAR_HEIGHT, GAP, LABEL_WIDTH, CHART_WIDTH = 18, 6, 260, 900


@dataclass(frozen=True)
class CommitLine:
    commit: str | None
    episodes: int
    bytes: int
    behind: int | None  # commits behind the gate head; None when outside or unknown
    where: str  # "at head", "N behind", "outside the window", "unknown"
    css: str  # good, warn, bad, muted


def commit_lines(
    commits: dict[str | None, CommitSummary],
    positions: Callable[[str], int | None],
    gate: dict[str, object],
) -> list[CommitLine]:
    """Newest code first (by behind_by), then outside the window, then unknown; bounded."""
    window = gate.get("window")
    known = bool(gate.get("enabled")) and bool(gate.get("loaded"))
    lines = []
    for commit, summary in commits.items():
        behind = positions(commit) if commit is not None and known else None
        if commit is None or not known:
            where, css = "unknown", "muted"
        elif behind is None:
            where, css = "outside the window", "bad"
        else:
            where = "at head" if behind == 0 else f"{behind} behind"
            near = isinstance(window, int) and behind >= warning_threshold(window)
            css = "warn" if near else "good"
        lines.append(CommitLine(commit, summary.episodes, summary.bytes, behind, where, css))
    order = {"good": 0, "warn": 0, "bad": 1, "muted": 2}
    lines.sort(key=lambda c: (order[c.css], c.behind or 0, -c.episodes, c.commit or ""))
    if len(lines) > MAX_COMMITS:
        rest = lines[MAX_COMMITS - 1 :]
        other = CommitLine(
            None,
            sum(c.episodes for c in rest),
            sum(c.bytes for c in rest),
            None,
            f"{len(rest)} other commits",
            "muted",
        )
        lines = [*lines[: MAX_COMMITS - 1], other]
    return lines


def render_commits(lines: list[CommitLine], human_bytes: Callable[[int], str]) -> str:
    if not lines:
        return '<p class="muted" id="commits">No episodes yet.</p>'
    most = max(c.episodes for c in lines) or 1
    height = len(lines) * (BAR_HEIGHT + GAP)
    bars = []
    for number, line in enumerate(lines):
        y = number * (BAR_HEIGHT + GAP)
        width = max(1, round((CHART_WIDTH - LABEL_WIDTH - 150) * line.episodes / most))
        name = line.commit[:SHORT] if line.commit else "no commit"
        label = f"{name} · {line.where}" if line.commit else line.where
        figures = f"{line.episodes} ep · {human_bytes(line.bytes)}"
        bars.append(
            f'<g class="bar {line.css}" data-commit="{_e(line.commit or "")}">'
            f"<title>{_e(line.commit or label)}: {_e(figures)}, {_e(line.where)}</title>"
            f'<text x="0" y="{y + 13}">{_e(label)}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{width}" height="{BAR_HEIGHT}" rx="3"/>'
            f'<text x="{LABEL_WIDTH + width + 6}" y="{y + 13}">{_e(figures)}</text></g>'
        )
    rows = "".join(
        f'<tr class="{line.css}"><td>{_e(line.commit or "—")}</td><td>{_e(line.where)}</td>'
        f'<td class="num">{line.episodes}</td>'
        f'<td class="num" title="{line.bytes} bytes">{_e(human_bytes(line.bytes))}</td></tr>'
        for line in lines
    )
    return (
        f'<svg id="commit-chart" role="img" aria-label="episodes per commit" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" width="100%" style="max-width:{CHART_WIDTH}px"'
        f' xmlns="http://www.w3.org/2000/svg">{"".join(bars)}</svg>'
        '<details><summary>As a table</summary><table id="commits"><thead><tr><th>Commit</th>'
        '<th>Behind head</th><th class="num">Episodes</th><th class="num">Bytes</th></tr>'
        f"</thead><tbody>{rows}</tbody></table></details>"
    )


COMMIT_CSS = """
#commit-chart text{font:12px ui-monospace,"DejaVu Sans Mono",monospace;fill:var(--ink)}
#commit-chart .good rect{fill:var(--good)}#commit-chart .warn rect{fill:#f79009}
#commit-chart .bad rect{fill:var(--bad)}#commit-chart .muted rect{fill:#98a2b3}
details{margin-top:8px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
