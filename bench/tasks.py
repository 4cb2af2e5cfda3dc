"""Plain Celery tasks: the baselines, run by the same workers as our handlers."""

from __future__ import annotations

import time
from typing import Any

from project.celery_app import app
from project.events import event_bus


@app.task(name="bench.tasks.probe", ignore_result=True)  # type: ignore[untyped-decorator]
def probe(sent_at: float) -> None:
    """Record apply_async → task start."""
    started = time.time()
    event_bus.sync_client().rpush(f"{event_bus.keys.prefix}:bench:latency", started - sent_at)


@app.task(name="bench.tasks.count", ignore_result=True)  # type: ignore[untyped-decorator]
def count(*args: Any) -> None:
    """The same no-op (counted) work as the bench handlers."""
    event_bus.sync_client().incr(f"{event_bus.keys.prefix}:bench:done")
