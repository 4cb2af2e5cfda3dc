"""The overview's figures over a recent window: events by scope, deliveries by status, latency.

What the record holds about timing, and so what the latency figure measures: an event's
``occurred_at`` is its publish time; a delivery's ``created_at`` is when the router sent its
Celery task, and its ``updated_at`` when its latest status was recorded (for a delivery that
succeeded at its first attempt: when the handler returned). The moment a handler started is
not kept (its ``started`` status is overwritten by the outcome), so the overview shows the
two figures that bracket it: publish → dispatch (the router's share) and publish → handler
done (dispatch, the wait in the queue and the handler's own run), p50 and p99 per bucket,
from every event of the window or, past :data:`LATENCY_SAMPLE` events, from a uniform sample.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

__all__ = ["LATENCY_SAMPLE", "Overview", "Window", "overview"]

_MAX_BUCKETS = 180
# The latency figure's buckets are coarser: each needs a few hundred deliveries for its p99.
_MAX_LATENCY_BUCKETS = 36
_MAX_SCOPES = 8


@dataclass(frozen=True, slots=True)
class Window:
    """The last ``hours`` up to ``until``, cut into buckets of ``step_s`` seconds."""

    until: datetime
    hours: float

    @property
    def since(self) -> datetime:
        return self.until - timedelta(hours=self.hours)

    @property
    def step_s(self) -> int:
        """A whole number of minutes, so that there are at most 180 buckets."""
        return _step(self.hours, _MAX_BUCKETS)

    @property
    def latency_step_s(self) -> int:
        """The latency figure's bucket: at most 36 of them."""
        return _step(self.hours, _MAX_LATENCY_BUCKETS)

    def first(self, step_s: int) -> int:
        """The number of the window's first bucket of ``step_s`` seconds (since the epoch)."""
        return int(self.since.timestamp()) // step_s

    def buckets(self, step_s: int) -> list[datetime]:
        """The start of every bucket of ``step_s`` seconds, oldest first."""
        last = int(self.until.timestamp()) // step_s
        return [datetime.fromtimestamp(b * step_s, UTC) for b in range(self.first(step_s), last + 1)]


def _step(hours: float, buckets: int) -> int:
    return 60 * max(1, math.ceil(hours * 60 / buckets))


@dataclass(slots=True)
class Overview:
    """The overview's figures; each series has one value per bucket of ``window``."""

    window: Window
    buckets: list[datetime]
    latency_buckets: list[datetime]
    events_per_minute: dict[str, list[float]] = field(default_factory=dict)
    events_total: int = 0
    deliveries_by_status: list[tuple[str, int]] = field(default_factory=list)
    latency_ms: dict[str, list[float | None]] = field(default_factory=dict)
    latency_sample: int = 0  # deliveries the latency figure is drawn from
    latency_every: int = 1  # one event in this many was sampled


# date_part (a double), not extract (a numeric: several times slower over many rows).
_EVENTS = sa.text(
    """
    SELECT floor(date_part('epoch', occurred_at) / :step)::bigint AS bucket,
           split_part(event_type, '.', 1) AS scope, count(*) AS n
    FROM events_log
    WHERE occurred_at >= :since AND occurred_at < :until
    GROUP BY 1, 2
    """
)
_STATUSES = sa.text(
    "SELECT status, count(*) AS n FROM event_deliveries WHERE created_at >= :since AND created_at < :until"
    " GROUP BY status ORDER BY n DESC"
)
# Every `every`-th event of the window (by id, which the log writer hands out in arrival
# order: a uniform sample over time) with its deliveries: the percentiles' cost is bounded
# by the sample, not by the window's traffic.
_LATENCY = sa.text(
    """
    SELECT floor(date_part('epoch', e.occurred_at) / :step)::bigint AS bucket,
           percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY date_part('epoch', d.created_at - e.occurred_at))
               AS dispatch,
           percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY date_part('epoch', d.updated_at - e.occurred_at))
               FILTER (WHERE d.status = 'succeeded' AND d.attempts <= 1) AS done,
           count(*) AS n
    FROM events_log e JOIN event_deliveries d ON d.event_id = e.event_id
    WHERE e.occurred_at >= :since AND e.occurred_at < :until AND e.id % :every = 0
    GROUP BY 1
    """
)
#: How many events of the window the latency figure samples, at most (each probe of their
#: deliveries is a random read: the sample bounds the figure's cost, whatever the traffic).
LATENCY_SAMPLE = 3_000


def overview(conn: sa.Connection, window: Window) -> Overview:
    """Read the overview's figures for ``window``."""
    step = window.step_s
    out = Overview(window, window.buckets(step), window.buckets(window.latency_step_s))
    params = {"since": window.since, "until": window.until, "step": step}
    per_scope: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(out.buckets))
    for row in conn.execute(_EVENTS, params):
        i = int(row.bucket) - window.first(step)
        if 0 <= i < len(out.buckets):
            per_scope[str(row.scope)][i] += int(row.n) / (step / 60)
            out.events_total += int(row.n)
    ranked = sorted(per_scope, key=lambda s: -sum(per_scope[s]))
    for scope in ranked[:_MAX_SCOPES]:
        out.events_per_minute[scope] = per_scope[scope]
    if len(ranked) > _MAX_SCOPES:
        rest = ranked[_MAX_SCOPES:]
        out.events_per_minute["other"] = [sum(per_scope[s][i] for s in rest) for i in range(len(out.buckets))]
    out.deliveries_by_status = [(str(r.status), int(r.n)) for r in conn.execute(_STATUSES, params)]
    names = [f"publish → {what} {q}" for what in ("dispatch", "handler done") for q in ("p50", "p99")]
    lines: dict[str, list[float | None]] = {name: [None] * len(out.latency_buckets) for name in names}
    out.latency_every = max(1, math.ceil(out.events_total / LATENCY_SAMPLE))
    step = window.latency_step_s
    for row in conn.execute(_LATENCY, {**params, "step": step, "every": out.latency_every}):
        out.latency_sample += int(row.n)
        i = int(row.bucket) - window.first(step)
        if not 0 <= i < len(out.latency_buckets):
            continue
        for name, values in zip(names, [*(row.dispatch or (None, None)), *(row.done or (None, None))], strict=True):
            lines[name][i] = None if values is None else float(values) * 1000
    out.latency_ms = lines
    return out
