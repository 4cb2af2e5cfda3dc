"""The Grafana dashboard without Grafana: its own queries, run against a Prometheus, drawn as
SVG line charts on one self-contained HTML page, and a screenshot of it with headless chromium.

    .venv/bin/python -m monitoring.render_dashboard --prometheus http://127.0.0.1:9090 \\
        --minutes 30 --html /tmp/dashboard.html --png /tmp/dashboard.png

Grafana does not run on our CI machines. This reads ``grafana/dashboards/eventbus.json``,
puts each panel where its ``gridPos`` says, replaces ``$__rate_interval`` as Grafana does
(``max(step + scrape interval, 4 x scrape interval)``), runs every target's expression through
``/api/v1/query_range`` and draws one polyline per series, with the legend (``legendFormat``,
last and max value), the y range and the unit. It prints, per panel and target, whether the
query returned data, and exits 1 if one did not. Standard library only.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "DASHBOARD",
    "Panel",
    "QueryError",
    "Series",
    "Target",
    "load_panels",
    "main",
    "page_size",
    "query_panels",
    "query_range",
    "rate_interval_s",
    "render",
    "render_html",
    "report",
    "screenshot",
]

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "eventbus.json"

# Pixels: Grafana's 24-column grid on a fixed-width page, 30 px per grid row.
_PAGE_W, _ROW_H, _GAP, _PAD, _HEADER_H = 1600, 30, 8, 12, 40
_TITLE_H, _AXIS_W, _AXIS_H = 26, 64, 18
# The legend: a row's height, a value column's width, and about one character of 11 px text.
_LEGEND_ROW_H, _VALUE_W, _CHAR_W = 15, 78, 6.8
# Grafana's classic palette, in its order.
_COLORS = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0",
           "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477")  # fmt: skip
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# One series of a query_range result: its labels and its finite (unix time s, value) points.
_Found = tuple[dict[str, str], list[tuple[float, float]]]


class QueryError(Exception):
    """Raised when Prometheus refuses a query or cannot be reached."""


@dataclass(frozen=True)
class Series:
    """One time series of a query's result: its legend and its finite ``(unix time s, value)`` points."""

    label: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Target:
    """One query of a panel and, once run, the series it returned."""

    ref_id: str
    expr: str
    legend_format: str
    series: tuple[Series, ...] = ()

    @property
    def has_data(self) -> bool:
        """Whether at least one series has at least one finite point."""
        return any(s.points for s in self.series)


@dataclass(frozen=True)
class Panel:
    """A time-series panel: title, unit, place on the grid (x, y, w, h) and targets."""

    title: str
    unit: str
    grid: tuple[int, int, int, int]
    targets: tuple[Target, ...]


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The panels of the Grafana dashboard at ``path``, in grid order (top to bottom, left to right)."""
    dashboard = json.loads(path.read_text())
    panels = []
    for p in dashboard["panels"]:
        g = p["gridPos"]
        targets = tuple(Target(t["refId"], t["expr"], t.get("legendFormat", "")) for t in p.get("targets", []))
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        panels.append(Panel(p["title"], unit, (g["x"], g["y"], g["w"], g["h"]), targets))
    return sorted(panels, key=lambda p: (p.grid[1], p.grid[0]))


def rate_interval_s(step_s: float, scrape_interval_s: float) -> float:
    """Grafana's ``$__rate_interval``: at least four scrapes, and more than one step plus a scrape."""
    return max(step_s + scrape_interval_s, 4 * scrape_interval_s)


def _expand(expr: str, rate_interval: float) -> str:
    out = expr.replace("$__rate_interval", f"{math.ceil(rate_interval)}s")
    if "$" in out:
        raise ValueError(f"{expr!r} uses a dashboard variable this renderer does not know; only $__rate_interval")
    return out


def query_range(base_url: str, expr: str, start: float, end: float, step_s: float) -> list[_Found]:
    """Run ``expr`` over ``[start, end]`` every ``step_s``: each series' labels and finite points.

    Raises:
        QueryError: Prometheus answered with an error, or did not answer.
    """
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/api/v1/query_range?{query}", timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # a bad query: 400 with a JSON error
        raise QueryError(f"{expr!r}: {exc.code} {exc.read().decode(errors='replace')}") from exc
    except OSError as exc:
        raise QueryError(f"{expr!r}: cannot reach {base_url}: {exc}") from exc
    if body.get("status") != "success":
        raise QueryError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    result = []
    for item in body["data"]["result"]:
        points = [(float(t), float(v)) for t, v in item["values"]]
        # histogram_quantile over an idle window is NaN (0/0): Grafana leaves a gap there too.
        result.append((item["metric"], [(t, v) for t, v in points if math.isfinite(v)]))
    return result


def _legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if fmt:
        return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{{{shown}}}" if shown else expr


def query_panels(
    panels: Sequence[Panel], base_url: str, start: float, end: float, step_s: float, rate_interval: float
) -> list[Panel]:
    """``panels`` with every target's series, queried from the Prometheus at ``base_url``.

    Raises:
        QueryError: a query failed.
        ValueError: an expression uses a dashboard variable other than ``$__rate_interval``.
    """
    done = []
    for panel in panels:
        targets = []
        for t in panel.targets:
            found = query_range(base_url, _expand(t.expr, rate_interval), start, end, step_s)
            series = tuple(Series(_legend(t.legend_format, labels, t.expr), tuple(pts)) for labels, pts in found)
            targets.append(replace(t, series=tuple(sorted(series, key=lambda s: s.label))))
        done.append(replace(panel, targets=tuple(targets)))
    return done


def report(panels: Sequence[Panel]) -> list[str]:
    """One line per panel and target: whether its query returned data, and how many series."""
    lines = []
    for p in panels:
        for t in p.targets:
            status = "ok   " if t.has_data else "EMPTY"
            lines.append(f"{status} {p.title} [{t.ref_id}]: {len([s for s in t.series if s.points])} series")
    return lines


def _format(value: float, unit: str) -> str:
    if unit == "s":
        if value == 0 or abs(value) >= 1:
            return f"{value:.3g} s"
        return f"{value * 1000:.3g} ms"
    text = f"{value / 1000:.3g}k" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} ops/s" if unit == "ops" else text


def _box(grid: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    x, y, w, h = grid
    col = (_PAGE_W - 2 * _PAD + _GAP) / 24
    return _PAD + x * col, _HEADER_H + y * _ROW_H, w * col - _GAP, h * _ROW_H - _GAP


def page_size(panels: Sequence[Panel]) -> tuple[int, int]:
    """The page's width and height in pixels: the screenshot's window size."""
    bottom = max((p.grid[1] + p.grid[3] for p in panels), default=0)
    return _PAGE_W, _HEADER_H + bottom * _ROW_H + _PAD


def _chart(panel: Panel, width: float, height: float, start: float, end: float) -> str:
    series = [s for t in panel.targets for s in t.series if s.points]
    plot_w, plot_h = width - _AXIS_W - 8, height - _AXIS_H - 8
    parts = [f'<svg width="{width:.0f}" height="{height:.0f}" xmlns="http://www.w3.org/2000/svg">']
    if not series:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" class="nodata">No data</text></svg>')
        return "".join(parts)
    values = [v for s in series for _, v in s.points]
    low, high = min(0.0, *values), max(values)
    if high <= low:
        high = low + 1
    span_t = max(end - start, 1e-9)

    def xy(t: float, v: float) -> str:
        x = _AXIS_W + (t - start) / span_t * plot_w
        return f"{x:.1f},{4 + plot_h - (v - low) / (high - low) * plot_h:.1f}"

    for fraction in (0.0, 0.5, 1.0):
        y = 4 + plot_h - fraction * plot_h
        label = html.escape(_format(low + fraction * (high - low), panel.unit))
        parts.append(f'<line x1="{_AXIS_W}" x2="{_AXIS_W + plot_w:.0f}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{_AXIS_W - 6}" y="{y + 4:.1f}" class="ylabel">{label}</text>')
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x, when = _AXIS_W + fraction * plot_w, time.strftime("%H:%M:%S", time.gmtime(start + fraction * span_t))
        parts.append(f'<text x="{x:.0f}" y="{height - 4:.0f}" class="xlabel" text-anchor="{anchor}">{when}</text>')
    step = min((b[0] - a[0] for s in series for a, b in zip(s.points, s.points[1:], strict=False)), default=1.0)
    for i, s in enumerate(series):
        # A gap in the data (NaN samples, a missed scrape) is a gap in the line.
        segments: list[list[str]] = [[]]
        for j, (t, v) in enumerate(s.points):
            if j and t - s.points[j - 1][0] > 1.5 * step:
                segments.append([])
            segments[-1].append(xy(t, v))
        color = _COLORS[i % len(_COLORS)]
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="1.5" fill="{color}"/>')
            else:
                parts.append(f'<polyline points="{" ".join(seg)}" stroke="{color}" class="line"/>')
    parts.append("</svg>")
    return "".join(parts)


def _shorten(label: str, chars: int) -> str:
    # The end of a handler's dotted name tells handlers apart: cut in the middle, not at the end.
    if len(label) <= chars:
        return label
    head = chars // 4
    return f"{label[:head]}…{label[len(label) - (chars - head - 1) :]}"


def _legend_table(panel: Panel, width: float, height: float) -> str:
    series = [s for t in panel.targets for s in t.series if s.points]
    if not series:
        return ""
    fit = max(1, int((height - _LEGEND_ROW_H) // _LEGEND_ROW_H))
    shown = series if len(series) <= fit else series[: fit - 1]
    chars = int((width - 2 * _VALUE_W - 24) / _CHAR_W)
    rows = [f'<table class="legend"><col><col style="width:{_VALUE_W}px"><col style="width:{_VALUE_W}px">',
            "<tr><th></th><th>Last *</th><th>Max</th></tr>"]  # fmt: skip
    for i, s in enumerate(shown):
        last, peak = s.points[-1][1], max(v for _, v in s.points)
        rows.append(
            f'<tr><td class="name" title="{html.escape(s.label)}"><span style="background:{_COLORS[i % len(_COLORS)]}">'
            f"</span>{html.escape(_shorten(s.label, chars))}</td><td>{html.escape(_format(last, panel.unit))}</td>"
            f"<td>{html.escape(_format(peak, panel.unit))}</td></tr>"
        )
    if len(shown) < len(series):
        rows.append(f'<tr><td class="name more">… {len(series) - len(shown)} more series</td><td></td><td></td></tr>')
    rows.append("</table>")
    return "".join(rows)


_CSS = """
body { margin: 0; background: #111217; color: #ccccdc; font: 12px/1.3 "DejaVu Sans", sans-serif; }
header { position: absolute; left: 12px; top: 10px; font-size: 15px; }
header small { color: #8e8e9e; font-size: 12px; margin-left: 12px; }
.panel { position: absolute; background: #181b1f; border: 1px solid #2c3235; border-radius: 3px; overflow: hidden; }
.panel h2 { margin: 0; height: 26px; line-height: 26px; padding: 0 8px; font-size: 13px; font-weight: 500;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.panel h2 small { color: #8e8e9e; font-weight: 400; margin-left: 6px; }
.body { display: flex; }
.legend { border-collapse: collapse; table-layout: fixed; width: 100%; font-size: 11px; }
.legend th, .legend td { height: 15px; line-height: 15px; padding: 0 4px; white-space: nowrap; }
.legend th { color: #8e8e9e; font-weight: 400; text-align: right; }
.legend td { text-align: right; }
.legend td.name { text-align: left; overflow: hidden; text-overflow: ellipsis; }
.legend td.more { color: #8e8e9e; }
.legend span { display: inline-block; width: 12px; height: 3px; margin: 0 5px 3px 0; }
.grid { stroke: #2c3235; stroke-width: 1; }
.line { fill: none; stroke-width: 1.5; stroke-linejoin: round; }
.ylabel { fill: #8e8e9e; font-size: 10px; text-anchor: end; }
.xlabel { fill: #8e8e9e; font-size: 10px; }
.nodata { fill: #8e8e9e; font-size: 14px; text-anchor: middle; }
"""


def render_html(panels: Sequence[Panel], start: float, end: float, subtitle: str = "") -> str:
    """A self-contained HTML page of ``panels`` (already queried) over ``[start, end]``."""
    width, height = page_size(panels)
    first, last = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)), time.strftime("%H:%M:%S", time.gmtime(end))
    span = f"{first} to {last} UTC"
    out = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>eventbus</title><style>{_CSS}</style></head>',
        f'<body style="width:{width}px;height:{height}px">',
        f"<header>eventbus<small>{html.escape(span)}{html.escape(subtitle)}</small></header>",
    ]
    for p in panels:
        left, top, w, h = _box(p.grid)
        legend_w = round(w * 0.5)
        chart_w, chart_h = w - legend_w - 4, h - _TITLE_H - 4
        out.append(
            f'<div class="panel" style="left:{left:.0f}px;top:{top:.0f}px;width:{w:.0f}px;height:{h:.0f}px">'
            f"<h2>{html.escape(p.title)}<small>{html.escape(p.unit)}</small></h2>"
            f'<div class="body">{_chart(p, chart_w, chart_h, start, end)}'
            f'<div style="width:{legend_w}px">{_legend_table(p, legend_w, chart_h)}</div></div></div>'
        )
    out.append("</body></html>")
    return "\n".join(out)


def screenshot(html_path: Path, png_path: Path, size: tuple[int, int]) -> None:
    """Take a screenshot of ``html_path`` at ``size`` (width, height) with Debian's headless chromium.

    Raises:
        FileNotFoundError: no ``chromium`` on the PATH.
        RuntimeError: chromium wrote no screenshot.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("no chromium on the PATH (Debian's chromium package; scripts/install-test-tools)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as profile:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
             f"--screenshot={png_path.resolve()}", html_path.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    if not png_path.exists():
        raise RuntimeError(f"chromium wrote no screenshot ({done.returncode}): {done.stderr[-2000:]}")


def render(
    base_url: str,
    start: float,
    end: float,
    html_path: Path,
    *,
    scrape_interval_s: float = 15.0,
    step_s: float | None = None,
    rate_interval: float | None = None,
    png_path: Path | None = None,
    dashboard: Path = DASHBOARD,
) -> list[Panel]:
    """Query every panel of ``dashboard`` over ``[start, end]``, write the page to ``html_path``
    (and its screenshot to ``png_path``); return the panels with their series.

    ``step_s`` defaults to about 400 points over the range, ``rate_interval`` (seconds) to
    Grafana's ``$__rate_interval`` for that step and ``scrape_interval_s``.

    Raises:
        QueryError: a query failed.
        FileNotFoundError, RuntimeError: see :func:`screenshot`.
    """
    step = step_s or max(1.0, round((end - start) / 400))
    window = rate_interval or rate_interval_s(step, scrape_interval_s)
    panels = query_panels(load_panels(dashboard), base_url, start, end, step, window)
    subtitle = f" · step {step:g}s, $__rate_interval {math.ceil(window)}s · queries from {dashboard.name}"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(panels, start, end, subtitle))
    if png_path is not None:
        screenshot(html_path, png_path, page_size(panels))
    return panels


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: render, print the report; 1 if a target returned no data."""
    parser = argparse.ArgumentParser(prog="python -m monitoring.render_dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=60.0, help="the range: the last N minutes (60)")
    parser.add_argument("--start", type=float, help="range start, unix seconds (instead of --minutes)")
    parser.add_argument("--end", type=float, help="range end, unix seconds (default: now)")
    parser.add_argument("--scrape-interval-s", type=float, default=15.0, help="Prometheus' scrape interval (15)")
    parser.add_argument("--rate-interval-s", type=float, help="$__rate_interval (default: as Grafana computes it)")
    parser.add_argument("--step-s", type=float, help="query resolution (default: about 400 points)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--html", type=Path, required=True, help="where to write the page")
    parser.add_argument("--png", type=Path, help="where to write its screenshot (needs chromium)")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - 60 * args.minutes
    panels = render(
        args.prometheus, start, end, args.html, scrape_interval_s=args.scrape_interval_s, step_s=args.step_s,
        rate_interval=args.rate_interval_s, png_path=args.png, dashboard=args.dashboard,
    )  # fmt: skip
    lines = report(panels)
    print("\n".join(lines))
    return 1 if any(line.startswith("EMPTY") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
