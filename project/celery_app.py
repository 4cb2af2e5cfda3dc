"""The one Celery app: ``celery -A project.celery_app worker -Q <queue>``.

Importing this module connects receivers and reads no settings; the configuration is read
from ``celeryconfig`` when Celery first needs it, and the handler modules are loaded (and
one task registered per subscription) when a worker or beat starts.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from project import signals as recording
from project.delivery import register_tasks
from project.events import event_bus

__all__ = ["app", "load_handlers"]

app = Celery("project")
app.config_from_object("celeryconfig")
recording.connect()


def load_handlers() -> None:
    """Load ``EVENT_HANDLER_MODULES`` into the bus and register their Celery tasks."""
    event_bus.load_modules()
    register_tasks(app, event_bus)


def _on_start(**_: Any) -> None:
    # In the worker's main process, before the pool forks: children inherit the modules.
    load_handlers()


signals.worker_init.connect(_on_start, weak=False, dispatch_uid="eventbus.load_handlers")
signals.beat_init.connect(_on_start, weak=False, dispatch_uid="eventbus.load_handlers.beat")
