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


# Two handlers of one event: the setup bench.commands counts Redis commands per handler run on.
@event_bus.subscribe("bench.pair.made", queue=QUEUE, max_retries=0)
def pair_a(event: dict[str, Any]) -> None:
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.pair.made", queue=QUEUE, max_retries=0)
def pair_b(event: dict[str, Any]) -> None:
    event_bus.sync_client().incr(_counter())


@event_bus.subscribe("bench.latency.probe", queue=QUEUE, max_retries=0)
def latency_probe(event: dict[str, Any]) -> None:
    """Record publish → handler start: ``<seconds> <start time> <event_id> <task id>`` (bench.latency)."""
    started = time.time()
    published = datetime.fromisoformat(event["timestamp"]).timestamp()
    delivery = getattr(event, "delivery", None)  # the worker hands over an Event, a dict with its delivery
    task_id = delivery.task_id if delivery is not None else "-"
    event_bus.sync_client().rpush(
        f"{event_bus.keys.prefix}:bench:latency",
        f"{started - published:.6f} {started:.6f} {event['event_id']} {task_id}",
    )
