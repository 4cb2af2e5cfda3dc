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
    text = json.dumps(config["scrape_configs"])
    for target in ("router:9101", "log-writer:9102"):
        assert target in text
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    workers = {name for name, svc in compose.items() if "worker" in (svc.get("command") or [])}
    scraped = {name for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    assert workers == scraped
    assert compose["prometheus"]["profiles"] == compose["grafana"]["profiles"] == ["monitoring"]
