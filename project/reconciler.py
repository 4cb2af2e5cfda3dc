"""The reconciler: sends again deliveries that were lost on their way, records those whose record was.

kombu's Redis transport takes a message off its queue (BRPOP) before the worker records it
as unacknowledged; a worker's main process killed in between loses that message for good,
and plain Celery cannot notice. The record can: such a delivery stays ``dispatched`` in
``event_deliveries`` while no worker ever started it, so it has no state in Redis: no
hash (``Keys.delivery``) and nothing in its lease key, the gate (``Keys.lease``). A first
copy runs with a lease and no hash, so a lease alone means running.

Every ``RECONCILE_INTERVAL_S`` one router (a lock in Redis picks it) looks for deliveries
``dispatched``, ``retrying`` or ``failed`` (an attempt failed while Redis could not take its
outcome, so no retry was decided) more than ``RECONCILE_AFTER_S`` ago and less than
``DELIVERY_DONE_TTL_S`` ago (past that, a missing state no longer proves the delivery never
started, so they are only reported), and looks at each one's state in Redis:

- none: it never started, or a first copy's worker was lost and its lease lapsed, so it is
  sent again with its own task id, from the event as the record holds it, and that copy
  counts a presumed attempt (``UNCOUNTED_HEADER``);
- ``running`` or ``retrying`` with no worker holding its lease: its worker was lost (or its
  done mark could not be written), so it is sent again too;
- ``done`` or ``dead``: a worker settled it but its record was lost (Redis failed between
  the two), so the settled status is recorded now. It costs nothing per delivery on the hot path: one query per
interval. A delivery that was only slow to start (a long queue) is sent twice; its second
copy is skipped by the workers' done check.

On a Redis Cluster a delivery's state, lease and log buffer are those of its event's scope
(``Keys.scoped``); the records of a pass go in one transaction per scope (one slot each),
and the lock stays one for the whole environment.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from project.broker import CONNECTION_ERRORS, BrokerError, sender_for
from project.keys import Keys
from project.lease import new_token
from project.messages import task_message
from project.records import delivery_record
from project.redis_conn import keys_for, redis_client
from project.settings import Settings

__all__ = ["Reconciler", "record_envelope"]

log = logging.getLogger("eventbus.reconciler")

_BATCH = 500

_STALE = sa.text(
    """
    SELECT d.event_id::text AS event_id, d.handler, d.queue, d.task_id::text AS task_id, d.updated_at,
           e.event_type, e.user_id, e.user_id_json, e.data, e.occurred_at, e.module,
           e.causation_id::text AS causation_id, e.correlation_id::text AS correlation_id, e.hops, e.version,
           e.replay_of::text AS replay_of
    FROM event_deliveries d JOIN events_log e ON e.event_id = d.event_id
    WHERE d.status IN ('dispatched', 'retrying', 'failed') AND d.updated_at < :before AND d.updated_at >= :after
    ORDER BY d.updated_at
    LIMIT :limit
    """
)

_TOO_OLD = sa.text("SELECT count(*) FROM event_deliveries WHERE status = 'dispatched' AND updated_at < :after")


def record_envelope(row: Any) -> str:
    """The envelope JSON of an event rebuilt from its events_log row (as the router sent it)."""
    user_id = row.user_id_json if row.user_id_json is not None else row.user_id
    envelope = {
        "event_id": row.event_id,
        "event_type": row.event_type,
        "user_id": user_id,
        "data": row.data,
        "timestamp": row.occurred_at.isoformat(),
        "module": row.module,
        "causation_id": row.causation_id,
        "correlation_id": row.correlation_id,
        "hops": row.hops,
    }
    if row.version is not None:
        envelope["version"] = row.version
    if getattr(row, "replay_of", None) is not None:
        envelope["replay_of"] = row.replay_of
    return json.dumps(envelope, separators=(",", ":"))


# What a pass may meet that says nothing of the deliveries: the next pass tries again.
# (RedisClusterException: no node of a Redis Cluster answers.)
_OUTAGES: tuple[type[Exception], ...] = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,
    sa.exc.SQLAlchemyError,
    BrokerError,
    *CONNECTION_ERRORS,
)


class Reconciler:
    """Finds deliveries lost between Redis and a worker, and sends them again."""

    def __init__(self, settings: Settings, *, engine: sa.Engine | None = None, client: redis.Redis | None = None):
        self.settings = settings
        self.keys = keys_for(settings)
        self.client: Any = client or redis_client(settings)
        self.engine = engine or sa.create_engine(settings.database_url, pool_pre_ping=True, pool_size=1)
        self._token = new_token()
        self.sender = sender_for(settings)  # Celery's queues on RabbitMQ, else None
        self.resent = 0
        self._reported_old = 0

    def run(self, stop: threading.Event) -> None:
        """Reconcile every ``RECONCILE_INTERVAL_S`` until ``stop`` is set; survives outages."""
        s = self.settings
        if s.reconcile_after_s <= 0:
            return
        while not stop.wait(s.reconcile_interval_s):
            try:
                self.reconcile_once()
            except _OUTAGES as exc:
                log.warning("reconciler: %s; trying again in %.0fs", str(exc).splitlines()[0], s.reconcile_interval_s)
            except Exception:  # a bug must not end the router's process
                log.exception("reconciler: unexpected error")
        if self.sender is not None:
            self.sender.close()

    def reconcile_once(self) -> int:
        """One pass (if no other router holds the pass); return how many deliveries were sent again."""
        s = self.settings
        if not self.client.set(self.keys.reconcile_lock, self._token, nx=True, px=int(s.reconcile_interval_s * 900)):
            return 0
        now = time.time()
        after = _ts(now - s.delivery_done_ttl_s * 0.9)
        with self.engine.connect() as conn:
            rows = list(
                conn.execute(_STALE, {"before": _ts(now - s.reconcile_after_s), "after": after, "limit": _BATCH})
            )
            too_old = int(conn.execute(_TOO_OLD, {"after": after}).scalar_one())
        if too_old and too_old != self._reported_old:
            log.error(
                "reconciler: %d deliveries have been 'dispatched' or 'retrying' for longer than "
                "DELIVERY_DONE_TTL_S; whether they ever started is no longer known, so they are not sent again "
                "automatically: look at them in event_deliveries",
                too_old,
            )
        self._reported_old = too_old
        if not rows:
            return 0
        pipe = self.client.pipeline(transaction=False)  # on a cluster, split by node
        for row in rows:
            keys = self.keys.scoped(row.event_type)
            pipe.hmget(keys.delivery(row.task_id), "state", "attempts")
            pipe.get(keys.lease(row.task_id))
        replies = pipe.execute()
        resend: list[tuple[Any, str]] = []
        settle: list[tuple[Any, str, int]] = []
        for i, row in enumerate(rows):
            (state, attempts), gate = replies[2 * i], replies[2 * i + 1]
            state = state.decode() if isinstance(state, bytes) else state
            gate = gate.decode() if isinstance(gate, bytes) else gate
            # The lease key is also the gate: 'done' or 'dead' once settled, 'retrying' between
            # attempts, else the token of the process running the delivery. A first copy runs
            # and settles with no hash (project.delivery).
            if gate in ("done", "dead") and state not in ("done", "dead"):
                state = gate
            leased = gate is not None and gate not in ("done", "dead", "retrying")
            if state is None and leased:
                continue  # a first copy running: it has a lease and no hash
            if state is None:  # or a first copy whose worker was lost, its lease lapsed: the same to resend
                resend.append((row, _NEVER_STARTED))
            elif state in ("done", "dead"):
                # At least one attempt ran: a first copy's counts itself nowhere (its
                # Event.redis_transaction marks the hash done without a count).
                settle.append((row, "succeeded" if state == "done" else "dead", max(int(attempts or 0), 1)))
            elif not leased:
                resend.append((row, f"{state} with no worker holding its lease (its worker was lost)"))
        if settle:
            self._settle(settle)
        if resend:
            self._resend(resend)
        return len(resend)

    def _settle(self, rows: list[tuple[Any, str, int]]) -> None:
        # The worker settled the delivery in Redis, but its record never reached the log (Redis
        # failed between the two): record it from the state.
        pipe = self.client.pipeline(transaction=False)
        for row, status, attempts in rows:
            note = "recorded by the reconciler from the delivery's state in Redis (the worker's record was lost)"
            buffer = self.keys.scoped(row.event_type).log_buffer
            pipe.xadd(buffer, {"r": delivery_record(row.event_id, row.handler, status, attempts, note)})
        pipe.execute()
        log.warning("reconciler: recorded %d settled deliveries whose own record was lost", len(rows))

    def _resend(self, rows: list[tuple[Any, str]]) -> None:
        tasks = [
            task_message(
                task_name=row.handler,
                task_id=row.task_id,
                queue=row.queue,
                envelope_json=record_envelope(row),
                event_type=row.event_type,
                event_id=row.event_id,
                # No state: it never started, or a first copy ran, uncounted, and its worker
                # was lost. The copy counts that attempt as if it had been made.
                uncounted=why == _NEVER_STARTED,
            )
            for row, why in rows
        ]
        if self.sender is not None:  # RabbitMQ: confirmed before it is recorded as sent
            self.sender.send(tasks)
        # A transaction touches one slot on a Redis Cluster: one per scope (in one Redis, all
        # rows share self.keys, so one transaction). Celery's queues are then on RabbitMQ.
        by_scope: defaultdict[Keys, list[tuple[Any, str, Any]]] = defaultdict(list)
        for (row, why), task in zip(rows, tasks, strict=True):
            by_scope[self.keys.scoped(row.event_type)].append((row, why, task))
        for keys, scoped in by_scope.items():
            pipe = self.client.pipeline(transaction=True)
            for row, why, task in scoped:
                if self.sender is None:
                    pipe.lpush(keys.celery_queue(row.queue), task.redis_form())
                note = f"sent again by the reconciler: {why} (last change {row.updated_at.isoformat()})"
                pipe.xadd(keys.log_buffer, {"r": delivery_record(row.event_id, row.handler, "dispatched", None, note)})
            pipe.execute()
        for row, why in rows:
            log.warning(
                "reconciler: delivery of event %s to %s was %s; sent again (task %s)",
                row.event_id, row.handler, why, row.task_id,
            )  # fmt: skip
        self.resent += len(rows)


_NEVER_STARTED = "dispatched and never started"


def _ts(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)
