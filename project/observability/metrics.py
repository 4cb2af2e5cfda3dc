"""The dispatcher's Prometheus metrics, and the calls the hot paths make to update them.

Nothing is recorded until :func:`enable` made the metrics: until then each ``record_*`` call
is one check of a module global, so a process with metrics off pays nothing for them. Labels
are bounded by the application's code (event types, handlers, queues), never by its data:
no event id or user id becomes a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = [
    "DELIVERY_OUTCOMES",
    "Metrics",
    "disable",
    "enable",
    "enabled",
    "record_delivery",
    "record_dispatch",
    "record_handler_run",
    "record_log_written",
    "record_published",
    "record_rejected",
]

#: What became of one copy of a delivery, as counted by ``eventbus_deliveries_total``.
DELIVERY_OUTCOMES = ("succeeded", "retried", "dead", "rejected", "skipped", "deferred")

# Handlers run from a millisecond to their time limit (600 s by default); publish-to-start
# is milliseconds when idle and minutes behind a backlog.
_DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True, slots=True)
class Metrics:
    """The metric objects of this process."""

    published: Counter
    dispatched: Counter
    router_entries: Counter
    tasks_sent: Counter
    deliveries: Counter
    handler_duration: Histogram
    start_delay: Histogram
    log_rows: Counter
    log_set_aside: Counter
    # ``published.labels(event_type)`` by event type: publish counts each event, and looking
    # the child up by its labels (a lock, a tuple of label values) costs more than the count.
    published_by_type: dict[str, Any] = field(default_factory=dict)


_metrics: Metrics | None = None


def enable(registry: CollectorRegistry | None) -> Metrics:
    """Make this process's metrics and start recording (idempotent).

    ``registry`` is where they are registered; ``None`` registers them nowhere, for
    prometheus_client's multiprocess mode, where a collector reads them from files instead.
    """
    global _metrics
    if _metrics is not None:
        return _metrics
    r = registry
    _metrics = Metrics(
        published=Counter(
            "eventbus_events_published", "Events this process published, by event type.", ["event_type"], registry=r
        ),
        dispatched=Counter(
            "eventbus_events_dispatched",
            "Events the router dispatched to their subscriptions' queues, by event type.",
            ["event_type"],
            registry=r,
        ),
        router_entries=Counter(
            "eventbus_router_entries",
            "Stream entries the router handled: dispatched, dead_lettered, skipped (taken over by another "
            "router) or duplicate (an event_id already dispatched).",
            ["outcome"],
            registry=r,
        ),
        tasks_sent=Counter(
            "eventbus_tasks_sent", "Celery task messages the router sent, by queue.", ["queue"], registry=r
        ),
        deliveries=Counter(
            "eventbus_deliveries",
            "What became of each copy of a delivery, by handler and outcome: " + ", ".join(DELIVERY_OUTCOMES) + ".",
            ["handler", "outcome"],
            registry=r,
        ),
        handler_duration=Histogram(
            "eventbus_handler_duration_seconds",
            "How long a handler ran, by handler (failed runs included).",
            ["handler"],
            buckets=_DURATION_BUCKETS_S,
            registry=r,
        ),
        start_delay=Histogram(
            "eventbus_delivery_start_delay_seconds",
            "From publish (the envelope's timestamp) to the handler's start, by handler.",
            ["handler"],
            buckets=_DURATION_BUCKETS_S,
            registry=r,
        ),
        log_rows=Counter(
            "eventbus_log_writer_rows_written",
            "Records the log writer wrote to PostgreSQL, by table.",
            ["table"],
            registry=r,
        ),
        log_set_aside=Counter(
            "eventbus_log_writer_rows_set_aside",
            "Records the log writer could not write (unreadable, or refused by PostgreSQL) and set aside.",
            registry=r,
        ),
    )
    return _metrics


def disable() -> None:
    """Stop recording in this process (the metric objects are dropped, not unregistered)."""
    global _metrics
    _metrics = None
    _unknown_labels.clear()


def enabled() -> Metrics | None:
    """This process's metrics, or None while they are off."""
    return _metrics


def record_published(event_type: str) -> None:
    """Count one event stored by publish."""
    m = _metrics
    if m is None:
        return
    child = m.published_by_type.get(event_type)
    if child is None:
        child = m.published_by_type[event_type] = m.published.labels(event_type)
    child.inc()


def record_dispatch(outcomes: dict[str, int], event_types: list[str], queues: list[str]) -> None:
    """Count the router's entries by outcome, and the events and task messages it sent."""
    m = _metrics
    if m is None:
        return
    for outcome, n in outcomes.items():
        if n:
            m.router_entries.labels(outcome).inc(n)
    for event_type in event_types:
        m.dispatched.labels(event_type).inc()
    for queue in queues:
        m.tasks_sent.labels(queue).inc()


def record_delivery(handler: str, outcome: str) -> None:
    """Count one copy of a delivery ending in ``outcome`` (one of :data:`DELIVERY_OUTCOMES`)."""
    if _metrics is not None:
        _metrics.deliveries.labels(handler, outcome).inc()


#: Task names from messages no worker knew, kept as ``handler`` labels; any further one is
#: counted as "other". Such a name comes from a message, not from the application's code:
#: a producer sending made-up names must not grow the metrics without bound.
MAX_UNKNOWN_TASK_LABELS = 100
_unknown_labels: set[str] = set()


def record_rejected(task_name: str) -> None:
    """Count one message of a task no worker had (``outcome="rejected"``), by its task name
    while there are few of them (:data:`MAX_UNKNOWN_TASK_LABELS`), then as "other"."""
    if _metrics is None:
        return
    label = task_name[:200]
    if label not in _unknown_labels:
        if len(_unknown_labels) >= MAX_UNKNOWN_TASK_LABELS:
            label = "other"
        else:
            _unknown_labels.add(label)
    _metrics.deliveries.labels(label, "rejected").inc()


def record_handler_run(handler: str, duration_s: float, start_delay_s: float | None) -> None:
    """Observe one handler run: how long it took and how long after publish it started."""
    m = _metrics
    if m is None:
        return
    m.handler_duration.labels(handler).observe(duration_s)
    if start_delay_s is not None:
        m.start_delay.labels(handler).observe(max(start_delay_s, 0.0))


def record_log_written(events: int, deliveries: int, set_aside: int) -> None:
    """Count the log writer's rows written per table, and the records it set aside."""
    m = _metrics
    if m is None:
        return
    if events:
        m.log_rows.labels("events_log").inc(events)
    if deliveries:
        m.log_rows.labels("event_deliveries").inc(deliveries)
    if set_aside:
        m.log_set_aside.inc(set_aside)
