"""Figures and how they are printed: product next to its same-run baseline, as a ratio.

Every figure keeps one product value, one baseline value and their ratio per run (the
disk drifts between runs, so only same-run ratios mean anything) and prints
min/median/max of each. A figure that cannot be measured here says why instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """What the issue asks of the ratio (or of the product value, when absolute)."""

    text: str
    met: Callable[[Figure], bool]


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    product_label: str
    baseline_label: str
    target: Target
    product: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    ratio_label: str = "product / baseline"
    notes: list[str] = field(default_factory=list)
    unavailable: str | None = None

    def add(self, product: float, baseline: float) -> None:
        self.product.append(product)
        self.baseline.append(baseline)

    @property
    def ratios(self) -> list[float]:
        return [
            p / b if b else float("inf") for p, b in zip(self.product, self.baseline, strict=True)
        ]

    def met(self) -> bool | None:
        if self.unavailable is not None or not self.product:
            return None
        return self.target.met(self)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def at_least(threshold: float) -> Target:
    return Target(f"ratio >= {threshold:g}", lambda f: median(f.ratios) >= threshold)


def _number(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def spread(values: Sequence[float]) -> str:
    """min / median / max."""
    if not values:
        return "-"
    return " / ".join(_number(v) for v in (min(values), median(values), max(values)))


def verdict(figure: Figure) -> str:
    met = figure.met()
    return "unavailable" if met is None else ("met" if met else "NOT MET")


def print_figure(figure: Figure) -> None:
    print(f"\n== {figure.key}: {figure.title}")
    if figure.unavailable is not None:
        print(f"  unavailable: {figure.unavailable}")
        return
    unit = figure.unit
    print(f"  {'min / median / max over ' + str(len(figure.product)) + ' runs':>44}")
    print(f"  product   {figure.product_label:<32} {spread(figure.product)} {unit}")
    print(f"  baseline  {figure.baseline_label:<32} {spread(figure.baseline)} {unit}")
    print(f"  ratio     {figure.ratio_label:<32} {spread(figure.ratios)}")
    for note in figure.notes:
        print(f"  note      {note}")
    print(f"  target    {figure.target.text}: {verdict(figure)}")


def summary_lines(figures: Sequence[Figure]) -> list[str]:
    """One line per figure; the smoke test reads these."""
    lines = ["", "== summary (median product | median baseline | ratio min/median/max | target)"]
    for figure in figures:
        if figure.unavailable is not None:
            lines.append(f"figure {figure.key:<11} unavailable: {figure.unavailable}")
            continue
        lines.append(
            f"figure {figure.key:<11} {_number(median(figure.product))} {figure.unit}"
            f" | {_number(median(figure.baseline))} {figure.unit}"
            f" | ratio {spread(figure.ratios)} | {figure.target.text}: {verdict(figure)}"
        )
    return lines
