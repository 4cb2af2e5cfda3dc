"""The event log: records buffered in a Redis stream, moved into PostgreSQL in batches.

Producers (the router's dispatch script, the workers' Celery signals) only XADD a compact
record (:mod:`project.records`) to ``<prefix>:log``; nothing on the dispatch path talks to
PostgreSQL. The :class:`LogWriter` reads the buffer through a consumer group, writes each
batch in one transaction with idempotent statements (``ON CONFLICT``), and acknowledges and
deletes the records only after the commit. PostgreSQL being down leaves them in the buffer,
pending. A record PostgreSQL refuses is found by bisecting its batch and set aside in
``<prefix>:log-rejected`` with the reason; the rest of the batch is written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
import redis
import sqlalchemy as sa
from psycopg2.extras import execute_values
from sqlalchemy.engine import Engine

from project.consumer import ConsumerConfig, GroupConsumer
from project.keys import LOG_GROUP
from project.messages import delivery_task_id
from project.observability import metrics
from project.records import DeliveryRecord, EventRecord, decode_record
from project.redis_conn import keys_for, redis_client
from project.scopes import ScopeLoops
from project.settings import Settings
from project.tables import DELIVERY_STATUSES

__all__ = ["LogWriter"]

log = logging.getLogger("eventbus.log_writer")

# Errors that mean "try again later": Redis or PostgreSQL unreachable, restarting, out of
# connections, or not migrated yet. Any other error is about the records, and is bisected.
_OUTAGES = (
    redis.RedisError,
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.UndefinedTable,
    psycopg2.errors.UndefinedColumn,
)
_REJECTED_MAXLEN = 100_000


def _is_outage(exc: BaseException) -> bool:
    # Statements run on the driver's cursor raise psycopg2's errors; SQLAlchemy's connect and
    # commit wrap them, with the driver's error as ``orig``.
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
    return isinstance(exc, _OUTAGES) or isinstance(orig, _OUTAGES)


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


@dataclass(slots=True)
class _Delivery:
    event_id: str
    handler: str
    queue: str | None
    status: str
    attempts: int | None  # None: keep the row's
    error: str | None
    created_at: datetime
    updated_at: datetime

    def rank(self, attempts: int | None) -> int:
        return (attempts or 0) * 10 + DELIVERY_STATUSES[self.status]

    def row(self) -> tuple[Any, ...]:
        return (self.event_id, self.handler, self.queue, delivery_task_id(self.event_id, self.handler), self.status,
                self.attempts or 0, self.error, self.created_at, self.updated_at)  # fmt: skip


@dataclass(slots=True)
class _Rows:
    """What one record contributes to a batch, checked before it joins one."""

    event: tuple[Any, ...] | None
    deliveries: list[_Delivery]


def _decode(raw: bytes) -> EventRecord | DeliveryRecord:
    if not raw.startswith(b"{"):
        return decode_record(raw)
    # The JSON-object records of earlier versions, still in a buffer across an upgrade.
    old = json.loads(raw)
    if old["k"] == "e":
        return EventRecord(float(old["at"]), old["event"], [(str(d[0]), str(d[1])) for d in old["d"]])
    if old["k"] == "d":
        attempt = old.get("attempt")
        return DeliveryRecord(float(old["at"]), str(old["event_id"]), str(old["handler"]), str(old["status"]),
                              None if attempt is None else int(attempt), old.get("error"))  # fmt: skip
    raise ValueError(f"unknown record kind {old['k']!r}")


def _rows(raw: bytes) -> _Rows:
    rec = _decode(raw)
    at = _ts(rec.at)
    if isinstance(rec, EventRecord):
        ev = rec.envelope
        event_id, user_id = str(ev["event_id"]), ev.get("user_id")
        event = (event_id, str(ev["event_type"]), None if user_id is None else str(user_id),
                 None if user_id is None else json.dumps(user_id), ev.get("module"), json.dumps(ev["data"]),
                 datetime.fromisoformat(ev["timestamp"]), ev.get("causation_id"), ev.get("correlation_id"),
                 int(ev.get("hops") or 0), ev.get("version"), ev.get("replay_of"))  # fmt: skip
        return _Rows(event, [_Delivery(event_id, h, q, "dispatched", 0, None, at, at) for h, q in rec.deliveries])
    if rec.status not in DELIVERY_STATUSES:
        raise ValueError(f"unknown status {rec.status!r}")
    error = None if rec.error is None else str(rec.error)
    return _Rows(None, [_Delivery(rec.event_id, rec.handler, None, rec.status, rec.attempts, error, at, at)])


class _Batch:
    """Rows of one batch, with every (event_id, handler) collapsed to its latest state."""

    def __init__(self, rows: list[_Rows]) -> None:
        self.events: dict[str, tuple[Any, ...]] = {}
        self.deliveries: dict[tuple[str, str], _Delivery] = {}
        for r in rows:
            if r.event is not None:
                self.events.setdefault(r.event[0], r.event)
            for d in r.deliveries:
                self._delivery(d)

    def _delivery(self, new: _Delivery) -> None:
        key = (new.event_id, new.handler)
        old = self.deliveries.get(key)
        if old is None:
            self.deliveries[key] = new
            return
        # Records arrive out of order: the later phase (attempt, then status) wins. A record
        # without attempts ("keep the row's") is compared at the other one's attempt.
        new_attempts = old.attempts if new.attempts is None else new.attempts
        old_attempts = new.attempts if old.attempts is None else old.attempts
        newer = (new.rank(new_attempts), new.updated_at) >= (old.rank(old_attempts), old.updated_at)
        win, lose = (new, old) if newer else (old, new)
        self.deliveries[key] = _Delivery(
            new.event_id,
            new.handler,
            win.queue or lose.queue,
            win.status,
            lose.attempts if win.attempts is None else win.attempts,
            win.error,
            min(old.created_at, new.created_at),
            win.updated_at,
        )

    def write(self, conn: sa.Connection) -> None:
        # psycopg2's execute_values: one multi-row statement per page, no per-row round trip
        # (SQLAlchemy's executemany sent these upserts one row at a time).
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if self.events:
                execute_values(cursor, _INSERT_EVENTS, list(self.events.values()), page_size=1000)
            known = [d.row() for d in self.deliveries.values() if d.attempts is not None]
            unknown = [d.row() for d in self.deliveries.values() if d.attempts is None]
            if known:
                execute_values(cursor, _UPSERT_DELIVERIES, known, page_size=1000)
            if unknown:
                execute_values(cursor, _UPSERT_DELIVERIES_KEEP_ATTEMPTS, unknown, page_size=1000)
        finally:
            cursor.close()


_RANK = "CASE {0}.status " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in DELIVERY_STATUSES.items()) + " ELSE 0 END"
_INSERT_EVENTS = """
INSERT INTO events_log (event_id, event_type, user_id, user_id_json, module, data, occurred_at, causation_id,
                        correlation_id, hops, version, replay_of)
VALUES %s ON CONFLICT (event_id) DO NOTHING
"""
_DELIVERY_COLUMNS = "(event_id, handler, queue, task_id, status, attempts, error, created_at, updated_at)"
_DELIVERY_COMMON = """
  status = EXCLUDED.status, error = EXCLUDED.error, updated_at = EXCLUDED.updated_at,
  queue = COALESCE(EXCLUDED.queue, d.queue), task_id = COALESCE(EXCLUDED.task_id, d.task_id),
  created_at = LEAST(EXCLUDED.created_at, d.created_at)
"""
# Records arrive out of order: a later phase (attempt, then status rank) is never overwritten
# by an earlier one.
_UPSERT_DELIVERIES = f"""
INSERT INTO event_deliveries AS d {_DELIVERY_COLUMNS} VALUES %s
ON CONFLICT (event_id, handler) DO UPDATE SET attempts = EXCLUDED.attempts, {_DELIVERY_COMMON}
WHERE EXCLUDED.attempts * 10 + {_RANK.format("EXCLUDED")} >= d.attempts * 10 + {_RANK.format("d")}
"""
# A record that does not know the attempt (attempts null) keeps the row's, and is ranked at it.
_UPSERT_DELIVERIES_KEEP_ATTEMPTS = f"""
INSERT INTO event_deliveries AS d {_DELIVERY_COLUMNS} VALUES %s
ON CONFLICT (event_id, handler) DO UPDATE SET {_DELIVERY_COMMON}
WHERE {_RANK.format("EXCLUDED")} >= {_RANK.format("d")}
"""

_Entry = tuple[Any, Any, _Rows]  # stream id, fields, rows
_Bad = tuple[Any, Any, str]  # stream id, fields, reason


class LogWriter:
    """Moves records from the Redis log buffer into ``events_log`` and ``event_deliveries``."""

    # How often the shed counters (records the full buffer could not take) are reported.
    shed_report_interval_s = 60.0

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        client: redis.Redis | None = None,
        consumer: str | None = None,
        scope: str | None = None,
    ) -> None:
        """A log writer of ``settings``' environment.

        On a Redis Cluster, ``scope`` makes it the writer of that scope's log buffer; without
        one, :meth:`run` runs a writer per scope (``project.scopes``), sharing the engine.
        """
        self.settings = settings
        base = keys_for(settings)
        self.keys = base if scope is None else base.of_scope(scope)
        self.client = client or redis_client(settings)
        self.engine = engine or sa.create_engine(settings.database_url, pool_pre_ping=True)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._written = 0
        self._rejected = 0
        self.scopes: ScopeLoops | None = None
        if self.keys.cluster and scope is None:
            self.scopes = ScopeLoops(
                "log writer",
                self.client,
                self.keys,
                lambda sc: LogWriter(
                    settings, engine=self.engine, client=self.client, consumer=self.consumer, scope=sc
                ),
                refresh_s=settings.scope_refresh_s,
                suffix="log",
            )

    @property
    def written(self) -> int:
        """Records written to PostgreSQL (by every scope's writer, on a cluster)."""
        return self._written + sum(w.written for w in self._scope_writers())

    @property
    def rejected(self) -> int:
        """Records set aside (by every scope's writer, on a cluster)."""
        return self._rejected + sum(w.rejected for w in self._scope_writers())

    def _scope_writers(self) -> list[LogWriter]:
        if self.scopes is None:
            return []
        return [w for w in self.scopes.loops.values() if isinstance(w, LogWriter)]

    def run(self, stop: threading.Event) -> None:
        """Write batches until ``stop`` is set; wait out Redis and PostgreSQL outages."""
        if self.scopes is not None:
            self.scopes.run(stop)
            return
        s = self.settings
        GroupConsumer(
            self.client,
            ConsumerConfig(
                what="log writer",
                stream=self.keys.log_buffer,
                group=LOG_GROUP,
                consumer=self.consumer,
                batch_size=s.log_batch_size,
                block_ms=s.log_block_ms,
                claim_idle_ms=s.log_claim_idle_ms,
                backoff_start_s=0.2,
                backoff_max_s=s.log_retry_max_s,
                # One commit per linger instead of one per handful of records is most of the
                # writer's cost under load.
                linger_ms=s.log_linger_ms,
                chores=((self.shed_report_interval_s, self.report_shed),),
            ),
            self.write,
            is_outage=_is_outage,
        ).run(stop)

    def report_shed(self) -> dict[str, int]:
        """Log an error if records were shed because the log buffer was full; return the counts.

        The counters are left as they are: they say how many records PostgreSQL is missing
        until someone resets them.
        """
        raw: Any = self.client.hgetall(self.keys.log_shed)
        counts = {k.decode(): int(v) for k, v in raw.items()}
        if any(counts.values()):
            log.error(
                "log writer: the log buffer %s reached LOG_BUFFER_MAX_RECORDS=%d and records were shed: "
                "%d event records and %d delivery records are missing from PostgreSQL (counted in %s; "
                "DEL it once dealt with)",
                self.keys.log_buffer,
                self.settings.log_buffer_max_records,
                counts.get("e", 0),
                counts.get("d", 0),
                self.keys.log_shed,
            )
        return counts

    def write(self, entries: Sequence[tuple[Any, Any]]) -> None:
        """Write ``entries`` (stream id, fields), then remove them from Redis.

        One transaction normally. If PostgreSQL (or the driver) refuses the batch for any
        reason other than an outage, the batch is bisected down to the records it refuses;
        those are set aside in the rejected stream and every other one is written.
        """
        parsed: list[_Entry] = []
        bad: list[_Bad] = []
        for entry_id, fields in entries:
            try:
                parsed.append((entry_id, fields, _rows(fields[b"r"])))
            except Exception as exc:  # a malformed record is set aside, never retried forever
                bad.append((entry_id, fields, f"unreadable record: {type(exc).__name__}: {exc}"[:2000]))
        good = self._write_bisecting(parsed, bad)
        self._finish(good, bad)
        if metrics.enabled() is not None:
            written = set(good)
            rows = [r for entry_id, _, r in parsed if entry_id in written]
            metrics.record_log_written(
                sum(r.event is not None for r in rows), sum(len(r.deliveries) for r in rows), len(bad)
            )

    def _write_bisecting(self, items: list[_Entry], bad: list[_Bad]) -> list[Any]:
        """Write ``items``; return the ids written. Refused records are appended to ``bad``."""
        if not items:
            return []
        try:
            with self.engine.begin() as conn:
                _Batch([rows for _, _, rows in items]).write(conn)
            return [entry_id for entry_id, _, _ in items]
        except Exception as exc:
            if _is_outage(exc):
                raise
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:2000]
            if len(items) == 1:
                bad.append((items[0][0], items[0][1], f"refused by PostgreSQL: {reason}"))
                return []
            log.warning("log writer: a batch of %d records was refused (%s); bisecting it", len(items), reason)
        mid = len(items) // 2
        return self._write_bisecting(items[:mid], bad) + self._write_bisecting(items[mid:], bad)

    def _finish(self, good: list[Any], bad: list[_Bad]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in bad:
            log.error("log writer: record %r set aside in %s: %s", entry_id, self.keys.log_rejected, reason)
            pipe.xadd(
                self.keys.log_rejected,
                {"id": entry_id, "reason": reason, **fields},
                maxlen=_REJECTED_MAXLEN,
                approximate=True,
            )
        ids = good + [b[0] for b in bad]
        if ids:
            pipe.xack(self.keys.log_buffer, LOG_GROUP, *ids)
            pipe.xdel(self.keys.log_buffer, *ids)
        pipe.execute()
        self._written += len(good)
        self._rejected += len(bad)
