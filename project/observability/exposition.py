"""Serving ``/metrics``: one HTTP listener per router or log writer, one per Celery worker.

A router or log writer is one process: its metrics live in a registry of its own, next to
the gauges it reads from Redis. A Celery worker is a main process and its prefork children;
their metrics go through prometheus_client's multiprocess mode (one file per process in
``PROMETHEUS_MULTIPROC_DIR``), summed by the listener in the main process.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values

from project.observability import metrics
from project.observability.gauges import LogBufferGauges, RouterGauges
from project.redis_conn import keys_for, redis_client
from project.settings import Settings

__all__ = ["forget_worker_child", "serve_process", "serve_worker"]

log = logging.getLogger("eventbus.metrics")

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve_process(settings: Settings, *, router: bool, log_writer: bool) -> int | None:
    """Start recording and serve ``/metrics`` for a router and/or a log writer in this process.

    Listens on ``METRICS_ROUTER_PORT`` when this process routes, else on
    ``METRICS_LOG_WRITER_PORT``. Returns the port, or None when ``METRICS_ENABLED`` is off.

    Raises:
        redis.RedisError: Redis could not be asked whether it is a cluster (``REDIS_CLUSTER`` unset).
    """
    if not settings.metrics_enabled:
        return None
    # One process: its counts live in memory and are served from its registry. Never in
    # PROMETHEUS_MULTIPROC_DIR (set for a worker beside it, or inherited), whose files a
    # worker's listener sums: they would be counted there a second time.
    values.ValueClass = values.MutexValue
    registry = CollectorRegistry()
    metrics.enable(registry)
    client = redis_client(settings, socket_timeout=5)
    keys = keys_for(settings)
    if router:
        registry.register(RouterGauges(client, keys, refresh_s=settings.scope_refresh_s))
    if log_writer:
        registry.register(LogBufferGauges(client, keys, refresh_s=settings.scope_refresh_s))
    port = settings.metrics_router_port if router else settings.metrics_log_writer_port
    start_http_server(port, addr=settings.metrics_address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_address, port)
    return port


def serve_worker(settings: Settings) -> int | None:
    """In a Celery worker's main process, before the pool forks: record in multiprocess mode
    and serve the sum over the main process and its children on ``METRICS_WORKER_PORT``.

    Returns the port, or None when ``METRICS_ENABLED`` is off.
    """
    if not settings.metrics_enabled:
        return None
    path = Path(settings.prometheus_multiproc_dir or tempfile.mkdtemp(prefix="eventbus-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    # Files left by an earlier run of this worker would add its counts to this one's.
    for stale in path.glob("*.db"):
        stale.unlink()
    # Children inherit the variable; prometheus_client picks the value class from it, once,
    # when it is imported, which may have been before this worker read its settings.
    os.environ[_MULTIPROC_ENV] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    metrics.enable(None)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    start_http_server(settings.metrics_worker_port, addr=settings.metrics_address, registry=registry)
    log.info(
        "metrics on http://%s:%d/metrics (files in %s)", settings.metrics_address, settings.metrics_worker_port, path
    )
    return settings.metrics_worker_port


def forget_worker_child(pid: int) -> None:
    """Drop the live-gauge files of a pool child that exited (its counters stay counted)."""
    path = os.environ.get(_MULTIPROC_ENV)
    if path and metrics.enabled() is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
