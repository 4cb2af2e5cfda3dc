"""What the explorer reads from the record: events, their deliveries and chains, and problems.

Every query is shaped for an index (migration 0006): lists walk ``(occurred_at, id)`` from a
keyset cursor instead of an OFFSET, so page 1,000 costs what page 1 does; a pattern becomes
the list of recorded event types it matches (found by a skip scan, matched with the
dispatcher's own :class:`~project.patterns.PatternTrie`), one index range each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from project.explorer.filters import Cursor, EventFilter
from project.patterns import PatternTrie

__all__ = [
    "FAILED_STATUSES",
    "PROBLEM_STATUSES",
    "DeliveryRow",
    "EventRow",
    "ProblemGroup",
    "chain_events",
    "deliveries_of",
    "error_key",
    "event_types",
    "find_error",
    "get_event",
    "list_events",
    "matching_types",
    "problem_count",
    "problem_groups",
]

# A delivery in one of these makes its event "have failed deliveries".
FAILED_STATUSES = ("failed", "dead", "rejected")
# What the problems page lists, and what a redrive sends again.
PROBLEM_STATUSES = ("dead", "rejected")


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of ``events_log`` (``data`` only where a page shows it)."""

    id: int
    event_id: str
    event_type: str
    user_id: str | None
    module: str | None
    occurred_at: datetime
    causation_id: str | None
    correlation_id: str | None
    hops: int
    version: int | None
    replay_of: str | None
    data: Any = None


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One row of ``event_deliveries``: a (event, handler) delivery and its latest status."""

    id: int
    event_id: str
    handler: str
    queue: str | None
    task_id: str | None
    status: str
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    redriven_at: datetime | None
    redrives: int

    @property
    def failed(self) -> bool:
        """Whether it ended (or stands) failed: ``failed``, ``dead`` or ``rejected``."""
        return self.status in FAILED_STATUSES


@dataclass(frozen=True, slots=True)
class ProblemGroup:
    """Dead or rejected deliveries of one handler that share one last error."""

    handler: str
    status: str
    error: str | None
    count: int
    first_at: datetime
    last_at: datetime
    in_flight: int  # redriven since they failed, their outcome not on record yet
    latest_event_id: str

    @property
    def key(self) -> str:
        """Names the error in a form: an error can be long, and have any characters."""
        return "" if self.error is None else error_key(self.error)


def error_key(error: str) -> str:
    """The digest :func:`find_error` finds ``error`` by (PostgreSQL's ``md5()`` of the same text)."""
    return hashlib.md5(error.encode(), usedforsecurity=False).hexdigest()


_EVENT_COLUMNS = (
    "e.id, e.event_id::text AS event_id, e.event_type, e.user_id, e.module, e.occurred_at,"
    " e.causation_id::text AS causation_id, e.correlation_id::text AS correlation_id, e.hops, e.version,"
    " e.replay_of::text AS replay_of"
)
_DELIVERY_COLUMNS = (
    "d.id, d.event_id::text AS event_id, d.handler, d.queue, d.task_id::text AS task_id, d.status, d.attempts,"
    " d.error, d.created_at, d.updated_at, d.redriven_at, d.redrives"
)

# Each distinct event type is one index probe on ix_events_log_event_type_occurred_at (a
# loose index scan), not a scan of the table as SELECT DISTINCT would be.
_EVENT_TYPES = sa.text(
    """
    WITH RECURSIVE t(event_type) AS (
        SELECT min(event_type) FROM events_log
        UNION ALL
        SELECT (SELECT min(event_type) FROM events_log WHERE event_type > t.event_type)
        FROM t WHERE t.event_type IS NOT NULL
    )
    SELECT event_type FROM t WHERE event_type IS NOT NULL
    """
)


def _event(row: sa.Row[Any]) -> EventRow:
    return EventRow(**row._mapping)


def _delivery(row: sa.Row[Any]) -> DeliveryRow:
    return DeliveryRow(**{f.name: row._mapping[f.name] for f in fields(DeliveryRow)})


def event_types(conn: sa.Connection) -> list[str]:
    """Every event type on record, sorted."""
    return [str(t) for t in conn.execute(_EVENT_TYPES).scalars()]


def matching_types(conn: sa.Connection, pattern: str | None) -> list[str] | None:
    """The recorded event types ``pattern`` matches, or None when it matches every one."""
    if pattern is None or pattern == "#":
        return None
    trie: PatternTrie[str] = PatternTrie()
    trie.insert(pattern, pattern)
    every = event_types(conn)
    matched = [t for t in every if trie.match(t)]
    return None if len(matched) == len(every) else matched


def list_events(
    conn: sa.Connection, flt: EventFilter, *, before: Cursor | None = None, after: Cursor | None = None, limit: int = 50
) -> list[EventRow]:
    """A page of the events ``flt`` selects, newest first.

    ``before`` gives the ``limit`` events just older than a cursor (the next page), ``after``
    the ``limit`` just newer (the previous one); neither, the newest.
    """
    types = matching_types(conn, flt.pattern)
    if types == []:
        return []
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    for clause, key, value in (
        ("e.user_id = :user_id", "user_id", flt.user_id),
        ("e.module = :module", "module", flt.module),
        ("e.occurred_at >= :since", "since", flt.since),
        ("e.occurred_at < :until", "until", flt.until),
    ):
        if value is not None:
            clauses.append(clause)
            params[key] = value
    if flt.failed:
        # The partial index ix_event_deliveries_failed holds only these deliveries.
        clauses.append(
            "e.event_id IN (SELECT event_id FROM event_deliveries WHERE status IN ('failed', 'dead', 'rejected'))"
        )
    order = "DESC"
    if after is not None:
        clauses.append("(e.occurred_at, e.id) > (:at, :row_id)")
        params.update(at=after.occurred_at, row_id=after.id)
        order = "ASC"
    elif before is not None:
        clauses.append("(e.occurred_at, e.id) < (:at, :row_id)")
        params.update(at=before.occurred_at, row_id=before.id)
    order_by = f"ORDER BY occurred_at {order}, id {order} LIMIT :limit"
    if types is None:
        where = " AND ".join(clauses) or "TRUE"
        sql = f"SELECT {_EVENT_COLUMNS} FROM events_log e WHERE {where} {order_by}"
    else:
        # One index range per matching type, each cut at `limit`, then merged: an
        # `event_type = ANY(...)` would read every row of every type before sorting. Each
        # type is its own literal, so the planner sees how rare it is (a LATERAL over the
        # list would plan every type as an average one).
        branches = []
        for n, event_type in enumerate(types):
            where = " AND ".join([f"e.event_type = :type{n}", *clauses])
            branches.append(
                f"(SELECT {_EVENT_COLUMNS} FROM events_log e WHERE {where}"
                f" ORDER BY e.occurred_at {order}, e.id {order} LIMIT :limit)"
            )
            params[f"type{n}"] = event_type
        sql = f"SELECT * FROM ({' UNION ALL '.join(branches)}) x {order_by}"
    rows = [_event(r) for r in conn.execute(sa.text(sql), params)]
    return rows[::-1] if after is not None else rows


def get_event(conn: sa.Connection, event_id: str) -> EventRow | None:
    """The event ``event_id``, with its data, or None if it is not on record."""
    row = conn.execute(
        sa.text(f"SELECT {_EVENT_COLUMNS}, e.data FROM events_log e WHERE e.event_id = CAST(:id AS uuid)"),
        {"id": event_id},
    ).first()
    return None if row is None else _event(row)


def deliveries_of(conn: sa.Connection, event_ids: list[str]) -> list[DeliveryRow]:
    """Every delivery of the events ``event_ids``, by event then creation."""
    if not event_ids:
        return []
    rows = conn.execute(
        sa.text(
            f"SELECT {_DELIVERY_COLUMNS} FROM event_deliveries d WHERE d.event_id = ANY(CAST(:ids AS uuid[]))"
            " ORDER BY d.event_id, d.created_at, d.handler"
        ),
        {"ids": event_ids},
    )
    return [_delivery(r) for r in rows]


def chain_events(conn: sa.Connection, correlation_ids: list[str], limit: int) -> list[EventRow]:
    """The events of the chains ``correlation_ids`` (a root's correlation_id is its own id).

    At most ``limit`` per chain, earliest first: a cosmic event fanned out to every user can
    make a chain of thousands, and a page shows its beginning.
    """
    if not correlation_ids:
        return []
    rows = conn.execute(
        sa.text(
            f"SELECT x.* FROM unnest(CAST(:ids AS uuid[])) AS c(id) CROSS JOIN LATERAL"
            f" (SELECT {_EVENT_COLUMNS} FROM events_log e WHERE e.correlation_id = c.id"
            " ORDER BY e.hops, e.occurred_at, e.id LIMIT :limit) x"
        ),
        {"ids": correlation_ids, "limit": limit},
    )
    return [_event(r) for r in rows]


# Hash-grouped in one pass over the (few) dead and rejected rows; each group's latest event
# is then one probe of ix_event_deliveries_problems (an array_agg(... ORDER BY) would sort
# every row instead).
_PROBLEMS = sa.text(
    """
    WITH g AS (
        SELECT handler, status, error, count(*) AS count, min(updated_at) AS first_at, max(updated_at) AS last_at,
               count(*) FILTER (WHERE redriven_at > updated_at) AS in_flight
        FROM event_deliveries
        WHERE status IN ('dead', 'rejected')
        GROUP BY handler, status, error
        ORDER BY last_at DESC
        LIMIT :limit
    )
    SELECT g.*, (
        SELECT d.event_id::text FROM event_deliveries d
        WHERE d.status IN ('dead', 'rejected') AND d.handler = g.handler AND d.updated_at = g.last_at
          AND d.status = g.status AND d.error IS NOT DISTINCT FROM g.error
        LIMIT 1
    ) AS latest_event_id
    FROM g ORDER BY g.last_at DESC
    """
)


def problem_groups(conn: sa.Connection, limit: int = 200) -> list[ProblemGroup]:
    """Dead and rejected deliveries grouped by handler, status and last error, latest first."""
    return [ProblemGroup(**r._mapping) for r in conn.execute(_PROBLEMS, {"limit": limit})]


def find_error(conn: sa.Connection, handler: str, status: str, key: str) -> str | None:
    """The last error of a problem group, from its :func:`error_key`; None if no delivery has it now."""
    row = conn.execute(
        sa.text(
            "SELECT error FROM event_deliveries WHERE status = :status AND handler = :handler AND md5(error) = :key"
            " LIMIT 1"
        ),
        {"status": status, "handler": handler, "key": key},
    ).first()
    return None if row is None else str(row.error)


def problem_count(conn: sa.Connection, handler: str, status: str, error: str | None) -> int:
    """How many deliveries a redrive of one problem group selects now.

    A redrive filter matches an error exactly or, with ``error`` None, any error: so does this.
    """
    sql = "SELECT count(*) FROM event_deliveries WHERE status = :status AND handler = :handler"
    if error is not None:
        sql += " AND error = :error"
    return int(conn.execute(sa.text(sql), {"status": status, "handler": handler, "error": error}).scalar_one())
