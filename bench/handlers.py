"""Subscriptions the benchmark's workers run (EVENT_HANDLER_MODULES=bench.handlers)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from project.events import event_bus

QUEUE = "bench"


def _counter() -> str:
    return f"{event_bus.keys.prefix}:bench:done"


@event_bus.subscribe("bench.item.made", queue=QUEUE, max_retries=0)
def count_a(event: dict[str, Any]) -> None:
    """A no-op handler, but for counting its runs."""
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.item.made", queue=QUEUE, max_retries=0)
def count_b(event: dict[str, Any]) -> None:
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.item.made", queue=QUEUE, max_retries=0)
def count_c(event: dict[str, Any]) -> None:
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.one.made", queue=QUEUE, max_retries=0)
def count_one(event: dict[str, Any]) -> None:
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.latency.probe", queue=QUEUE, max_retries=0)
def latency_probe(event: dict[str, Any]) -> None:
    """Record publish → handler start."""
    started = time.time()
    published = datetime.fromisoformat(event["timestamp"]).timestamp()
    event_bus.sync_client().rpush(f"{event_bus.keys.prefix}:bench:latency", started - published)
