"""The exactly-once helpers behind :class:`project.event.Event` (imported on first use)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from project.context import Outbox, collecting
from project.event import AlreadyHandled, Event, LeaseLost
from project.lease import keeper
from project.tables import delivery_inbox

if TYPE_CHECKING:
    from project.bus import EventBus

__all__ = ["redis_transaction", "send_outbox", "sql_transaction"]


@contextmanager
def sql_transaction(event: Event[Any], engine: sa.Engine | None) -> Iterator[sa.Connection]:
    """See :meth:`project.event.Event.transaction`."""
    d = event._delivery()
    outbox: Outbox = []
    if not d.recorded:  # the test kit: the same transaction and sending, no inbox row
        with (engine or _engine(d.bus)).begin() as conn, collecting(outbox):
            yield conn
        _send(d.bus, outbox)
        return
    with (engine or _engine(d.bus)).begin() as conn:
        row = conn.execute(
            insert(delivery_inbox)
            .values(task_id=d.task_id, event_id=event["event_id"], handler=d.handler)
            .on_conflict_do_nothing()
            .returning(delivery_inbox.c.task_id)
        ).first()
        if row is None:
            stored = conn.execute(
                sa.select(delivery_inbox.c.outbox).where(delivery_inbox.c.task_id == d.task_id)
            ).scalar_one()
            _send(d.bus, [(str(t), str(i), str(e)) for t, i, e in stored])
            raise AlreadyHandled(f"delivery {d.task_id} was handled before")
        with collecting(outbox):
            yield conn
        if outbox:
            conn.execute(
                sa.update(delivery_inbox)
                .where(delivery_inbox.c.task_id == d.task_id)
                .values(outbox=[list(item) for item in outbox])
            )
    _send(d.bus, outbox)


@contextmanager
def redis_transaction(event: Event[Any]) -> Iterator[redis.client.Pipeline]:
    """See :meth:`project.event.Event.redis_transaction`."""
    d = event._delivery()
    scoped = d.bus.keys.scoped(event.event_type)
    key, lease = scoped.delivery(d.task_id), scoped.lease(d.task_id)
    outbox: Outbox = []
    if not d.recorded:  # the test kit: the same MULTI/EXEC and sending, no done mark
        with d.bus.sync_client().pipeline(transaction=True) as pipe, collecting(outbox):
            yield pipe
            pipe.execute()
        _send(d.bus, outbox)
        return
    with d.bus.sync_client().pipeline(transaction=True) as pipe:
        pipe.watch(key)  # type: ignore[no-untyped-call]  # only another copy's start or end changes it
        # A first copy starts without looking at the hash (project.delivery): one that runs
        # after this delivery's effect committed finds the mark here, and sends what that
        # commit kept to send, in case it was not sent.
        state, kept = pipe.hmget(key, "state", "outbox")
        if state in (b"done", "done"):
            pipe.reset()
            if kept:
                send_outbox(d.bus, kept.decode() if isinstance(kept, bytes) else str(kept))
                d.bus.sync_client().hdel(key, "outbox")
            raise AlreadyHandled(f"delivery {d.task_id} was handled before")
        pipe.multi()
        with collecting(outbox):
            yield pipe
        mark: dict[str, str] = {"state": "done"}
        if outbox:
            mark["outbox"] = json.dumps(outbox)
        pipe.hset(key, mapping=mark)  # type: ignore[arg-type]
        pipe.expire(key, d.bus.settings.delivery_done_ttl_s)
        pipe.set(lease, "done", ex=d.bus.settings.delivery_done_ttl_s)  # the gate: every copy skips now
        try:
            pipe.execute()
        except redis.WatchError:
            raise LeaseLost(f"another copy of delivery {d.task_id} started; not committed") from None
    keeper.release(lease)  # the lease key holds the done mark now: nothing to renew
    _send(d.bus, outbox)
    if outbox:
        d.bus.sync_client().hdel(key, "outbox")


def _send(bus: EventBus, outbox: Outbox) -> None:
    for event_type, event_id, encoded in outbox:
        bus.send_encoded(event_type, event_id, encoded)


def send_outbox(bus: EventBus, outbox_json: str) -> None:
    """Send the events a committed block kept (its ``outbox`` mark, as JSON)."""
    _send(bus, [(str(t), str(i), str(e)) for t, i, e in json.loads(outbox_json)])


_engines: dict[tuple[int, str], sa.Engine] = {}


def _engine(bus: EventBus) -> sa.Engine:
    # One engine per process and URL: a prefork child never reuses its parent's sockets.
    url = bus.settings.database_url
    engine = _engines.get((os.getpid(), url))
    if engine is None:
        engine = _engines[(os.getpid(), url)] = sa.create_engine(url, pool_pre_ping=True, pool_size=2)
    return engine
