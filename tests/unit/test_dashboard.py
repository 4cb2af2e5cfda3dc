"""The Grafana dashboard and the Prometheus config name only metrics and services that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from project.observability import gauges, metrics

ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"eventbus_[a-z_]+")


def _known_names() -> set[str]:
    registry = CollectorRegistry()
    metrics.disable()
    try:
        metrics.enable(registry)
        names = {s.name for family in registry.collect() for s in family.samples}
        names |= {f"{family.name}_total" for family in registry.collect() if family.type == "counter"}
        names |= {f"{family.name}_{suffix}" for family in registry.collect() if family.type == "histogram"
                  for suffix in ("bucket", "count", "sum")}  # fmt: skip
    finally:
        metrics.disable()
    return names | set(_NAME.findall(Path(gauges.__file__).read_text()))


def test_every_dashboard_query_names_a_metric_the_processes_serve() -> None:
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/eventbus.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"] for name in _NAME.findall(t["expr"])}
    assert used, "the dashboard queries nothing"
    assert used <= _known_names(), used - _known_names()


def test_prometheus_scrapes_each_process_kind_on_its_default_port() -> None:
    config = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    # Every replica of a service is scraped: each is looked up by DNS, on its kind's port.
    by_port: dict[int, set[str]] = {}
    for job in config["scrape_configs"]:
        assert "static_configs" not in job, job["job_name"]
        for sd in job["dns_sd_configs"]:
            by_port.setdefault(sd["port"], set()).update(sd["names"])
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    workers = {name for name, svc in compose.items() if "worker" in (svc.get("command") or [])}
    assert by_port == {9101: {"router"}, 9102: {"log-writer"}, 9103: workers}
    assert {"router", "log-writer"} <= set(compose)
    assert compose["prometheus"]["profiles"] == compose["grafana"]["profiles"] == ["monitoring"]
