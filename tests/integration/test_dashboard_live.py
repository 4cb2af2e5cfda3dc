"""The Grafana dashboard's own queries, run by a real Prometheus scraping a real router, log
writer and two-child prefork worker after real events: every panel shows data."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import pytest

from monitoring.render_dashboard import DASHBOARD, Panel, render
from tests.integration.conftest import Stack
from tests.integration.dashboard_demo import PROMETHEUS, SCRAPE_INTERVAL_S, observed, run_workload, wait_until_scraped

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus package is not installed (scripts/install-test-tools installs it)"
)
H = "tests.integration.app."


def _panel(panels: list[Panel], title: str) -> Panel:
    return next(p for p in panels if p.title == title)


def _labels(panel: Panel) -> set[str]:
    return {s.label for t in panel.targets for s in t.series if s.points}


@pytest.mark.timeout(150)
def test_every_dashboard_query_returns_data_from_real_processes(stack: Stack, tmp_path: Path) -> None:
    with observed(stack) as prometheus:
        start = time.time() - 2
        work = run_workload(stack, seconds=12)
        wait_until_scraped(stack, prometheus, work)
        page = tmp_path / "dashboard.html"
        panels = render(prometheus, start, time.time(), page, scrape_interval_s=SCRAPE_INTERVAL_S, step_s=1)

    empty = [f"{p.title} [{t.ref_id}] {t.expr}" for p in panels for t in p.targets if not t.has_data]
    assert not empty, "queries without data:\n" + "\n".join(empty)
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert sorted(p.title for p in panels) == sorted(titles)
    text = page.read_text()
    assert [title for title in titles if f"<h2>{html.escape(title)}<" not in text] == []

    # The failure panels show the failures themselves, not only zeros.
    assert {f"{H}flaky retried", f"{H}doomed retried", f"{H}doomed dead"} <= _labels(
        _panel(panels, "Retried, dead and rejected deliveries / s, by handler")
    )
    assert {"dead", "retried", "succeeded"} <= _labels(_panel(panels, "Deliveries / s, by outcome"))
    assert {"dispatched", "dead_lettered"} <= _labels(_panel(panels, "Router entries / s, by outcome"))
    dead_letter = _panel(panels, "Set aside").targets[0].series[0]
    assert max(v for _, v in dead_letter.points) == work.dead_lettered
    # Published by this process (the application) and by the worker (module.error).
    assert {"user.birth_data.updated", "module.error"} <= _labels(_panel(panels, "Events published / s, by type"))
    assert {"alpha", "beta", "gamma"} <= _labels(_panel(panels, "Task messages sent / s, by queue"))
    assert f"p95 {H}long_runner" in _labels(_panel(panels, "Handler duration p50 / p95, by handler"))
