"""The event log: records buffered in a Redis stream, moved into PostgreSQL in batches.

Producers (the router's dispatch script, the workers' Celery signals) only XADD a small JSON
record to ``<prefix>:log``; nothing on the dispatch path talks to PostgreSQL. The
:class:`LogWriter` reads the buffer through a consumer group, writes each batch in one
transaction with idempotent statements (``ON CONFLICT``), and acknowledges and deletes the
records only after the commit. PostgreSQL being down leaves them in the buffer, pending.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg2
import redis
import sqlalchemy as sa
from psycopg2.extras import execute_values
from sqlalchemy.engine import Engine

from project.keys import LOG_GROUP, Keys
from project.router import ensure_group
from project.settings import Settings
from project.tables import DELIVERY_STATUSES

__all__ = ["LogWriter", "delivery_record"]

log = logging.getLogger("eventbus.log_writer")

# Errors that mean "try again later": Redis or PostgreSQL unreachable, restarting, or not
# migrated yet. The driver's own classes too, as the batch is written on its raw cursor.
_OUTAGES = (
    redis.RedisError,
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.ProgrammingError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.ProgrammingError,
)


def delivery_record(
    *,
    event_id: str,
    handler: str,
    queue: str | None,
    task_id: str,
    status: str,
    attempt: int,
    error: str | None = None,
) -> str:
    """Encode a worker-side delivery record for the log buffer."""
    return json.dumps(
        {
            "k": "d",
            "at": time.time(),
            "event_id": event_id,
            "handler": handler,
            "queue": queue,
            "task_id": task_id,
            "status": status,
            "attempt": attempt,
            "error": error,
        }
    )


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


class _Batch:
    """Rows of one batch, with every (event_id, handler) collapsed to its latest state."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.deliveries: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, raw: bytes) -> None:
        rec = json.loads(raw)
        at = _ts(float(rec["at"]))
        if rec["k"] == "e":
            ev = rec["event"]
            self.events.setdefault(
                ev["event_id"],
                {
                    "event_id": ev["event_id"],
                    "event_type": ev["event_type"],
                    "user_id": None if ev.get("user_id") is None else str(ev["user_id"]),
                    "module": ev.get("module"),
                    "data": ev["data"],
                    "occurred_at": datetime.fromisoformat(ev["timestamp"]),
                    "causation_id": ev.get("causation_id"),
                    "correlation_id": ev.get("correlation_id"),
                    "hops": int(ev.get("hops") or 0),
                },
            )
            for handler, queue, task_id in rec["d"]:
                self._delivery(ev["event_id"], handler, queue, task_id, "dispatched", 0, None, at)
        elif rec["k"] == "d":
            if rec["status"] not in DELIVERY_STATUSES:
                raise ValueError(f"unknown status {rec['status']!r}")
            self._delivery(
                rec["event_id"],
                rec["handler"],
                rec.get("queue"),
                rec.get("task_id"),
                rec["status"],
                int(rec["attempt"]),
                rec.get("error"),
                at,
            )
        else:
            raise ValueError(f"unknown record kind {rec['k']!r}")

    def _delivery(
        self,
        event_id: str,
        handler: str,
        queue: str | None,
        task_id: str | None,
        status: str,
        attempt: int,
        error: str | None,
        at: datetime,
    ) -> None:
        row = {
            "event_id": event_id,
            "handler": handler,
            "queue": queue,
            "task_id": task_id,
            "status": status,
            "attempts": attempt,
            "error": error,
            "created_at": at,
            "updated_at": at,
        }
        key = (event_id, handler)
        old = self.deliveries.get(key)
        if old is None:
            self.deliveries[key] = row
            return
        created = min(old["created_at"], at)
        if (attempt * 10 + DELIVERY_STATUSES[status], at) >= (
            old["attempts"] * 10 + DELIVERY_STATUSES[old["status"]],
            old["updated_at"],
        ):
            row["queue"] = queue or old["queue"]
            row["task_id"] = task_id or old["task_id"]
            self.deliveries[key] = row
        self.deliveries[key]["created_at"] = created

    def write(self, conn: sa.Connection) -> None:
        # psycopg2's execute_values: one multi-row statement per page, no per-row round trip
        # (SQLAlchemy's executemany sent these upserts one row at a time).
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if self.events:
                rows = [(e["event_id"], e["event_type"], e["user_id"], e["module"], json.dumps(e["data"]),
                         e["occurred_at"], e["causation_id"], e["correlation_id"], e["hops"])
                        for e in self.events.values()]  # fmt: skip
                execute_values(cursor, _INSERT_EVENTS, rows, page_size=1000)
            if self.deliveries:
                rows = [(d["event_id"], d["handler"], d["queue"], d["task_id"], d["status"], d["attempts"], d["error"],
                         d["created_at"], d["updated_at"]) for d in self.deliveries.values()]  # fmt: skip
                execute_values(cursor, _UPSERT_DELIVERIES, rows, page_size=1000)
        finally:
            cursor.close()


_RANK = "CASE {0}.status " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in DELIVERY_STATUSES.items()) + " ELSE 0 END"
_INSERT_EVENTS = """
INSERT INTO events_log (event_id, event_type, user_id, module, data, occurred_at, causation_id, correlation_id, hops)
VALUES %s ON CONFLICT (event_id) DO NOTHING
"""
# Records arrive out of order: a later phase (attempt, then status rank) is never overwritten
# by an earlier one.
_UPSERT_DELIVERIES = f"""
INSERT INTO event_deliveries AS d (event_id, handler, queue, task_id, status, attempts, error, created_at, updated_at)
VALUES %s
ON CONFLICT (event_id, handler) DO UPDATE SET
  status = EXCLUDED.status, attempts = EXCLUDED.attempts, error = EXCLUDED.error,
  updated_at = EXCLUDED.updated_at, queue = COALESCE(EXCLUDED.queue, d.queue),
  task_id = COALESCE(EXCLUDED.task_id, d.task_id), created_at = LEAST(EXCLUDED.created_at, d.created_at)
WHERE EXCLUDED.attempts * 10 + {_RANK.format("EXCLUDED")} >= d.attempts * 10 + {_RANK.format("d")}
"""


class LogWriter:
    """Moves records from the Redis log buffer into ``events_log`` and ``event_deliveries``."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        client: redis.Redis | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.events_prefix)
        self.client = client or redis.Redis.from_url(settings.redis_url)
        self.engine = engine or sa.create_engine(settings.database_url, pool_pre_ping=True)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.written = 0
        self.rejected = 0

    def run(self, stop: threading.Event) -> None:
        """Write batches until ``stop`` is set; wait out Redis and PostgreSQL outages."""
        backoff_s = 0.2
        read_pending = True
        next_claim_at = 0.0
        while not stop.is_set():
            try:
                ensure_group(self.client, self.keys.log_buffer, LOG_GROUP)
                if time.monotonic() >= next_claim_at:
                    self.client.xautoclaim(
                        self.keys.log_buffer,
                        LOG_GROUP,
                        self.consumer,
                        self.settings.log_claim_idle_ms,
                        count=self.settings.log_batch_size,
                    )
                    next_claim_at = time.monotonic() + self.settings.log_claim_idle_ms / 2000
                    read_pending = True
                reply: Any = self.client.xreadgroup(
                    LOG_GROUP,
                    self.consumer,
                    {self.keys.log_buffer: "0" if read_pending else ">"},
                    count=self.settings.log_batch_size,
                    block=None if read_pending else self.settings.log_block_ms,
                )
                entries = reply[0][1] if reply else []
                if read_pending and not entries:
                    read_pending = False
                    continue
                if entries:
                    self.write(entries)  # acknowledged on commit: nothing of ours stays pending
                    if len(entries) < self.settings.log_batch_size:
                        # Let a batch build up: one commit per linger instead of one per
                        # handful of records is most of the writer's cost under load.
                        stop.wait(self.settings.log_linger_ms / 1000)
                backoff_s = 0.2
            except _OUTAGES as exc:
                # Records stay pending in Redis and are written once the outage ends.
                log.warning("log writer: %s; retrying in %.1fs", (str(exc).splitlines() or [""])[0], backoff_s)
            except Exception:  # a bug must not end the process; the batch stays pending
                log.exception("log writer: unexpected error; retrying in %.1fs", backoff_s)
            else:
                continue
            read_pending = True
            stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, self.settings.log_retry_max_s)

    def write(self, entries: list[tuple[Any, Any]]) -> None:
        """Write ``entries`` (stream id, fields) in one transaction, then remove them from Redis."""
        batch, good, bad = _Batch(), [], []
        for entry_id, fields in entries:
            try:
                batch.add(fields[b"r"])
                good.append(entry_id)
            except Exception as exc:  # a malformed record is set aside, never retried forever
                bad.append((entry_id, fields, f"{type(exc).__name__}: {exc}"))
        try:
            with self.engine.begin() as conn:
                batch.write(conn)
        except (sa.exc.DataError, psycopg2.DataError):
            if len(entries) == 1:
                bad.append((entries[0][0], entries[0][1], "rejected by PostgreSQL"))
                good = []
            else:  # find the record PostgreSQL refuses (e.g. '\\u0000' in JSONB) one by one
                for entry in entries:
                    self.write([entry])
                return
        self._finish(good, bad)

    def _finish(self, good: list[Any], bad: list[tuple[Any, Any, str]]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in bad:
            log.error("log writer: record %r set aside: %s", entry_id, reason)
            pipe.xadd(
                self.keys.log_rejected,
                {"id": entry_id, "reason": reason, **fields},
                maxlen=100_000,
                approximate=True,
            )
        ids = good + [b[0] for b in bad]
        if ids:
            pipe.xack(self.keys.log_buffer, LOG_GROUP, *ids)
            pipe.xdel(self.keys.log_buffer, *ids)
        pipe.execute()
        self.written += len(good)
        self.rejected += len(bad)
