"""The dashboard on a live system: a private Prometheus scraping a real router, log writer and
two-child prefork worker (and this process, which publishes) under a workload of the
integration tests' events, then the dashboard drawn by :mod:`monitoring.render_dashboard`.

    .venv/bin/python -m tests.integration.dashboard_demo          # 75 s of events -> docs/dashboard.png
    .venv/bin/python -m tests.integration.dashboard_demo --seconds 30 --png /tmp/dashboard.png

Needs Debian's ``prometheus`` and ``chromium`` (``scripts/install-test-tools``) and the test
Redis and PostgreSQL. Runs under an ``EVENTS_PREFIX`` and a database of its own, and stops
every process it started. ``test_dashboard_live.py`` runs the same stack, shorter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server

from monitoring.render_dashboard import render as render_dashboard
from monitoring.render_dashboard import report
from project.observability import metrics
from tests.conftest import wait_for
from tests.integration.conftest import REDIS_URL, ROOT, Stack, _db_url, _pg_admin, _stack_env

__all__ = ["PROMETHEUS", "Workload", "main", "observed", "run_workload", "wait_until_scraped"]

PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 1.0

# One round of the steady workload: (event type, data, deliveries it makes in tests.integration.app).
# doomed: three attempts, dead, and the module.error the worker publishes (one delivery more).
_ROUND: tuple[tuple[str, Mapping[str, Any], int], ...] = (
    *[("user.birth_data.updated", {"user_id": 7}, 1)] * 8,
    *[("bulk.item.made", {}, 2)] * 4,  # StormWatchModule.on_bulk, on_bulk_item
    *[("cosmic.solar_storm.detected", {"kp_index": 7}, 3)] * 3,  # on_storm, on_any_detection, on_anything_cosmic
    ("policy.long.requested", {"sleep_s": 0.2}, 1),
    ("policy.long.requested", {"sleep_s": 0.6}, 1),
    ("flaky.job.requested", {}, 1),  # fails twice, then succeeds
    ("user.birth_data.updated", {"user_id": 8}, 1),
    ("doomed.job.requested", {}, 2),
)


_BURST = 150


@dataclass
class Workload:
    """What :func:`run_workload` published: events, the deliveries they make, malformed entries."""

    events: int = 0
    deliveries: int = 0
    dead_lettered: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _instant(base_url: str, expr: str) -> float | None:
    """The value of ``expr`` now (its first series), or None when it has none."""
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{base_url}/api/v1/query?{query}", timeout=10) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_prometheus(base_url: str, condition: str, what: str) -> None:
    """Wait until ``condition`` (a filtering expression, ``x == 0``) returns a series."""
    wait_for(lambda: _instant(base_url, condition) is not None, timeout_s=30, interval_s=0.5, what=what)


@contextmanager
def _publisher_metrics(port: int) -> Iterator[None]:
    """This process counts what it publishes, on ``/metrics`` at ``port``, as an application would."""
    registry = CollectorRegistry()
    metrics.disable()
    metrics.enable(registry)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        metrics.disable()


@contextmanager
def observed(stack: Stack) -> Iterator[str]:
    """Start a two-child prefork worker, a router and a log writer of ``stack`` with metrics on,
    and a private Prometheus scraping them and this process every second; yield its base URL
    once every target is up. Prometheus is stopped on the way out; the rest is the stack's.
    """
    assert PROMETHEUS is not None, "no prometheus on the PATH (Debian's prometheus; scripts/install-test-tools)"
    ports = {job: _free_port() for job in ("router", "log-writer", "worker", "publisher", "prometheus")}
    on = {"METRICS_ENABLED": "1", "PROMETHEUS_MULTIPROC_DIR": str(stack.workdir / "worker-metrics")}
    stack.start_worker(concurrency=2, METRICS_WORKER_PORT=str(ports["worker"]), **on)
    stack.start_router("router", "--no-log-writer", METRICS_ROUTER_PORT=str(ports["router"]), **on)
    stack.start("log-writer", sys.executable, "-m", "project.cli", "log-writer", ready="metrics on",
                METRICS_LOG_WRITER_PORT=str(ports["log-writer"]), **on)  # fmt: skip
    interval = f"{SCRAPE_INTERVAL_S:g}s"
    jobs = ("router", "log-writer", "worker", "publisher")
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": f"eventbus-{job}", "static_configs": [{"targets": [f"127.0.0.1:{ports[job]}"]}]}
            for job in jobs
        ],
    }
    path = stack.workdir / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    url = f"http://127.0.0.1:{ports['prometheus']}"
    with _publisher_metrics(ports["publisher"]):
        stack.start("prometheus", PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={stack.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                    ready="Server is ready to receive web requests")  # fmt: skip
        try:
            _wait_prometheus(url, f"sum(up) == {len(jobs)}", "every target up")
            yield url
        finally:
            stack.stop("prometheus")


def run_workload(stack: Stack, seconds: float, rate_per_s: float = 8.0, bursts: int = 1) -> Workload:
    """Publish rounds of ``_ROUND`` at ``rate_per_s`` for ``seconds``, with ``bursts`` bursts of
    ``_BURST`` events spread over the run (a backlog for the workers and the log writer) and
    one malformed stream entry per burst (dead-lettered by the router)."""
    bus, done, sent = stack.bus(), Workload(), 0
    burst_at = [seconds * (i + 1) / (bursts + 1) for i in range(bursts)]
    started = time.monotonic()
    while (now := time.monotonic() - started) < seconds:
        if burst_at and now >= burst_at[0]:
            burst_at.pop(0)
            for i in range(_BURST):
                bus.publish_sync("user.birth_data.updated", {"user_id": i})
            stack.redis.xadd(bus.keys.stream, {"e": b"not json"})
            done.events += _BURST
            done.deliveries += _BURST
            done.dead_lettered += 1
        event_type, data, deliveries = _ROUND[sent % len(_ROUND)]
        bus.publish_sync(event_type, data)
        sent += 1
        done.events, done.deliveries = done.events + 1, done.deliveries + deliveries
        # Pacing, not waiting for a condition: the next event is due at a fixed time.
        time.sleep(max(0.0, started + sent / rate_per_s - time.monotonic()))
    return done


def wait_until_scraped(stack: Stack, prometheus: str, work: Workload, timeout_s: float = 90.0) -> None:
    """Wait until every delivery of ``work`` settled in PostgreSQL and Prometheus scraped the outcome."""
    stack.wait_query(
        "SELECT status FROM event_deliveries",
        until=lambda rows: len(rows) == work.deliveries and all(r.status in ("succeeded", "dead") for r in rows),
        timeout_s=timeout_s,
    )
    stack.settle()
    settled = f'sum(eventbus_deliveries_total{{outcome=~"succeeded|dead"}}) >= {work.deliveries}'
    _wait_prometheus(prometheus, settled, "every outcome scraped")
    dead_letter = f"max(eventbus_dead_letter_entries) >= {work.dead_lettered}"
    _wait_prometheus(prometheus, dead_letter, "the dead-letter stream scraped")


def _create_database(name: str) -> None:
    _pg_admin(f"CREATE DATABASE {name}")
    subprocess.run([sys.executable, "-m", "alembic", "-x", f"url={_db_url(name)}", "upgrade", "head"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip


def _forget(prefix: str, database: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()
    _pg_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def main(argv: list[str] | None = None) -> int:
    """Run the workload for ``--seconds`` and write the dashboard's screenshot to ``--png``."""
    parser = argparse.ArgumentParser(prog="python -m tests.integration.dashboard_demo", description=main.__doc__)
    parser.add_argument("--seconds", type=float, default=75.0, help="how long to publish (75)")
    parser.add_argument("--rate", type=float, default=8.0, help="events per second between bursts (8)")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--html", type=Path, help="keep the page here too")
    args = parser.parse_args(argv)
    prefix = f"dash{uuid.uuid4().hex[:8]}"
    database = f"eb_{prefix}"
    with tempfile.TemporaryDirectory(prefix="dashboard-demo-") as tmp:
        stack = Stack(prefix=prefix, database=database, workdir=Path(tmp), env=_stack_env(prefix, database))
        try:
            _create_database(database)
            with observed(stack) as prometheus:
                start = time.time()
                work = run_workload(stack, args.seconds, args.rate, bursts=max(1, round(args.seconds / 25)))
                wait_until_scraped(stack, prometheus, work)
                # A few idle scrapes at the right edge: the rates back at 0.
                _wait_prometheus(prometheus, "sum(increase(eventbus_deliveries_total[6s])) == 0", "idle")
                html = args.html or Path(tmp) / "dashboard.html"
                panels = render_dashboard(prometheus, start - 5, time.time(), html,
                                          scrape_interval_s=SCRAPE_INTERVAL_S, step_s=1, png_path=args.png)  # fmt: skip
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                sys.stderr.write(f"\n----- {log.name} -----\n{log.read_text(errors='replace')[-4000:]}\n")
            raise
        finally:
            for name in list(stack.procs):
                stack.stop(name)
            _forget(prefix, database)
    lines = report(panels)
    print("\n".join(lines))
    print(f"{work.events} events, {work.deliveries} deliveries, {work.dead_lettered} dead-lettered -> {args.png}")
    return 1 if any(line.startswith("EMPTY") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
