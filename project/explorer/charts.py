"""Charts as inline SVG, drawn on the server: the pages load nothing from anywhere else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape

__all__ = ["STATUS_COLOURS", "bar_list", "line_chart", "stacked_bars"]

_PALETTE = ("#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#546e7a", "#9e9d24")
STATUS_COLOURS = {
    "succeeded": "#2e7d32",
    "started": "#1565c0",
    "dispatched": "#90a4ae",
    "retrying": "#f9a825",
    "failed": "#ef6c00",
    "dead": "#c62828",
    "rejected": "#6d1b1b",
}
_W, _H, _LEFT, _BOTTOM, _TOP = 900, 220, 56, 22, 8


def _colour(i: int, name: str) -> str:
    return STATUS_COLOURS.get(name, _PALETTE[i % len(_PALETTE)])


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above ``value`` (a round top for the y axis)."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step < value:
        for m in (2.0, 2.5, 5.0, 10.0):
            if step * m >= value:
                return step * m
        step *= 10
    while step / 10 >= value:
        step /= 10
    return step


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def _frame(buckets: Sequence[datetime], top: float, unit: str) -> list[str]:
    """Axes, the y scale and a time label every so often."""
    plot_w, plot_h = _W - _LEFT - 4, _H - _BOTTOM - _TOP
    parts = [
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_W - 4}" y2="{_TOP + plot_h}" stroke="#999"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" stroke="#999"/>',
    ]
    for frac in (0.5, 1.0):
        y = _TOP + plot_h * (1 - frac)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - 4}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(top * frac)}{escape(unit)}</text>')
    if buckets:
        every = max(1, len(buckets) // 8)
        for i in range(0, len(buckets), every):
            x = _LEFT + plot_w * (i + 0.5) / len(buckets)
            label = buckets[i].strftime("%H:%M")
            parts.append(f'<text x="{x:.1f}" y="{_H - 6}" text-anchor="middle">{label}</text>')
    return parts


def _svg(parts: list[str], title: str, legend: Mapping[str, str]) -> str:
    keys = "".join(
        f'<span class="key"><i style="background:{colour}"></i>{escape(name)}</span>' for name, colour in legend.items()
    )
    return (
        f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}" font-size="11" font-family="sans-serif">'
        + "".join(parts)
        + f'</svg><div class="legend">{keys}</div></figure>'
    )


def stacked_bars(title: str, buckets: Sequence[datetime], series: Mapping[str, Sequence[float]], unit: str = "") -> str:
    """One bar per bucket, stacked by series (events per minute by scope, say)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(buckets))]
    top = _nice_max(max(totals, default=0))
    plot_w, plot_h = _W - _LEFT - 4, _H - _BOTTOM - _TOP
    bar_w = plot_w / max(1, len(buckets))
    parts = _frame(buckets, top, unit)
    legend = {}
    base = [0.0] * len(buckets)
    for n, (name, values) in enumerate(series.items()):
        colour = legend[name] = _colour(n, name)
        for i, value in enumerate(values):
            if not value:
                continue
            h = plot_h * value / top
            y = _TOP + plot_h - base[i] - h
            x = _LEFT + i * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 0.5, 0.5):.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{buckets[i]:%H:%M} {escape(name)}: {_fmt(value)}{escape(unit)}</title></rect>"
            )
            base[i] += h
    return _svg(parts, title, legend)


def line_chart(
    title: str, buckets: Sequence[datetime], series: Mapping[str, Sequence[float | None]], unit: str = ""
) -> str:
    """One line per series over the buckets; a None is a gap (no sample in that bucket)."""
    values = [v for line in series.values() for v in line if v is not None]
    top = _nice_max(max(values, default=0))
    plot_w, plot_h = _W - _LEFT - 4, _H - _BOTTOM - _TOP
    parts = _frame(buckets, top, unit)
    legend = {}
    for n, (name, line) in enumerate(series.items()):
        colour = legend[name] = _colour(n, name)
        points: list[str] = []
        for i, value in enumerate(line):
            if value is None:
                parts.append(_polyline(colour, points))
                points = []
                continue
            x = _LEFT + plot_w * (i + 0.5) / max(1, len(buckets))
            y = _TOP + plot_h * (1 - min(value, top) / top)
            points.append(f"{x:.1f},{y:.1f}")
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.6" fill="{colour}">'
                f"<title>{buckets[i]:%H:%M} {escape(name)}: {_fmt(value)}{escape(unit)}</title></circle>"
            )
        parts.append(_polyline(colour, points))
    return _svg(parts, title, legend)


def _polyline(colour: str, points: list[str]) -> str:
    if len(points) < 2:
        return ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>'


def bar_list(title: str, items: Sequence[tuple[str, int]], colour: str | None = None) -> str:
    """Horizontal bars with their counts (deliveries by status, say); one ``colour``, or one per name."""
    top = max((count for _, count in items), default=0) or 1
    row_h, width = 22, _W - 160 - 90
    height = max(row_h * len(items), row_h) + 4
    parts = []
    for i, (name, count) in enumerate(items):
        y = 2 + i * row_h
        w = width * count / top
        parts.append(f'<text x="150" y="{y + 15}" text-anchor="end">{escape(name)}</text>')
        fill = colour or _colour(i, name)
        parts.append(
            f'<rect x="160" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 6}" fill="{fill}">'
            f"<title>{escape(name)}: {count:,}</title></rect>"
        )
        parts.append(f'<text x="{160 + w + 6:.1f}" y="{y + 15}">{count:,}</text>')
    if not items:
        parts.append('<text x="160" y="15">nothing in this window</text>')
    return (
        f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {_W} {height}" role="img" aria-label="{escape(title)}" font-size="12" '
        f'font-family="sans-serif">{"".join(parts)}</svg></figure>'
    )
