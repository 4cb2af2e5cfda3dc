"""The one Celery app: ``celery -A project.celery_app worker -Q <queue>``.

Importing this module connects receivers and reads no settings; the configuration is read
from ``celeryconfig`` when Celery first needs it, and the handler modules are loaded (and
one task registered per subscription) when a worker or beat starts.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

from celery import Celery, signals

from project import kombu_fixes, malformed
from project import signals as recording
from project.delivery import register_tasks
from project.events import event_bus
from project.observability import otel_sdk
from project.observability.exposition import forget_worker_child, serve_worker
from project.settings import get_settings

__all__ = ["app", "load_handlers"]

log = logging.getLogger("eventbus.metrics")

app = Celery("project")
app.config_from_object("celeryconfig")
recording.connect()
kombu_fixes.apply()
malformed.apply()  # a message no router wrote never ends a worker


def load_handlers() -> None:
    """Load ``EVENT_HANDLER_MODULES`` into the bus and register their Celery tasks."""
    event_bus.load_modules()
    register_tasks(app, event_bus)


def _on_start(**_: Any) -> None:
    # In the worker's main process, before the pool forks: children inherit the modules.
    load_handlers()


def _on_worker_start(sender: Any = None, **_: Any) -> None:
    load_handlers()
    # The leases its main process took on receipt go back with messages put back unstarted,
    # once its pool processes are gone (a warm shutdown): see project.kombu_fixes.
    kombu_fixes.release_leases_on_restore(partial(kombu_fixes.pool_processes_gone, sender, os.getpid()))
    settings = get_settings()
    otel_sdk.configure(settings, service_name="eventbus-worker")
    # Also before the fork: the children inherit multiprocess mode and its directory.
    try:
        serve_worker(settings)
    except OSError as exc:  # the port is taken: the worker runs on, without its listener
        log.error(
            "metrics: cannot listen on %s:%d (%s); this worker serves no /metrics. Give each "
            "worker on a host a METRICS_WORKER_PORT of its own",
            settings.metrics_address,
            settings.metrics_worker_port,
            exc,
        )


def _on_child_exit(pid: int | None = None, **_: Any) -> None:
    otel_sdk.flush()
    if pid is not None:
        forget_worker_child(pid)


signals.worker_init.connect(_on_worker_start, weak=False, dispatch_uid="eventbus.load_handlers")
signals.worker_process_shutdown.connect(_on_child_exit, weak=False, dispatch_uid="eventbus.metrics.child_exit")
signals.beat_init.connect(_on_start, weak=False, dispatch_uid="eventbus.load_handlers.beat")
