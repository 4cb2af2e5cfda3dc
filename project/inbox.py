"""Exactly-once effects for handlers: the effect and the delivery's "handled" mark commit together.

A plain handler runs at least once: never twice in parallel, never again once its success is
recorded, but a worker killed after the handler's effect and before that record runs it
again. A handler that writes through one of these helpers has its effect exactly once:

- ``with event.transaction() as conn:`` (PostgreSQL) inserts the delivery into
  ``delivery_inbox`` in the same transaction as the handler's writes; a copy that finds the
  row skips the rest of its handler (the inbox pattern).
- ``with event.redis_transaction() as pipe:`` (Redis) queues the handler's commands in one
  MULTI/EXEC with the delivery's done mark; a copy that finds the mark is skipped on start.

Events published inside either block are kept with the mark and sent right after the
commit; if the process dies in between, the next copy sends them (publish deduplicates by
event id, and ids published from a handler are derived from the delivery), so they go out
exactly once too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from project.context import Outbox, collecting
from project.tables import delivery_inbox

if TYPE_CHECKING:
    from project.bus import EventBus

__all__ = ["AlreadyHandled", "Event", "LeaseLost", "send_outbox"]


class AlreadyHandled(Exception):
    """Raised out of a helper block when this delivery's effect was committed before; the
    delivery task catches it and counts the delivery as succeeded."""


class LeaseLost(Exception):
    """Raised when another copy of the delivery started while this one ran (its lease lapsed):
    the effect is not committed here, and the delivery is retried."""


@dataclass(frozen=True, slots=True)
class _Delivery:
    bus: EventBus
    task_id: str
    handler: str


class Event(dict[str, Any]):
    """The envelope a handler receives: a plain dict, plus the exactly-once helpers."""

    __slots__ = ("_delivery",)

    def __init__(self, envelope: dict[str, Any], bus: EventBus, task_id: str, handler: str) -> None:
        super().__init__(envelope)
        self._delivery = _Delivery(bus, task_id, handler)

    @contextmanager
    def transaction(self, engine: sa.Engine | None = None) -> Iterator[sa.Connection]:
        """A PostgreSQL transaction whose writes commit once per delivery.

        Yields a SQLAlchemy ``Connection`` in a transaction on ``engine`` (default: this
        process's engine for ``DATABASE_URL``, whose database must have ``delivery_inbox``).
        Events published inside are sent after the commit.

        Raises:
            AlreadyHandled: the delivery's effect committed before (after sending the events
                it published, in case a crash came between); the handler stops here.
        """
        d = self._delivery
        outbox: Outbox = []
        with (engine or _engine(d.bus)).begin() as conn:
            row = conn.execute(
                insert(delivery_inbox)
                .values(task_id=d.task_id, event_id=self["event_id"], handler=d.handler)
                .on_conflict_do_nothing()
                .returning(delivery_inbox.c.task_id)
            ).first()
            if row is None:
                stored = conn.execute(
                    sa.select(delivery_inbox.c.outbox).where(delivery_inbox.c.task_id == d.task_id)
                ).scalar_one()
                _send(d.bus, [tuple(item) for item in stored])  # type: ignore[misc]
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
    def redis_transaction(self) -> Iterator[redis.client.Pipeline]:
        """A Redis MULTI/EXEC whose commands run once per delivery, with its done mark.

        Yields a redis-py pipeline (transaction mode) on the bus's Redis; queue commands on
        it. On leaving the block they run in one MULTI/EXEC together with the mark that
        makes every later copy of the delivery skip. Events published inside are sent after.

        Raises:
            LeaseLost: another copy started meanwhile; nothing was committed here.
        """
        d = self._delivery
        key = d.bus.keys.delivery(d.task_id)
        outbox: Outbox = []
        with d.bus.sync_client().pipeline(transaction=True) as pipe:
            pipe.watch(key)  # type: ignore[no-untyped-call]  # only another copy's start or end changes it while we run
            pipe.multi()
            with collecting(outbox):
                yield pipe
            mark: dict[str, str] = {"state": "done"}
            if outbox:
                mark["outbox"] = json.dumps(outbox)
            pipe.hset(key, mapping=mark)  # type: ignore[arg-type]
            pipe.expire(key, d.bus.settings.delivery_done_ttl_s)
            try:
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost(f"another copy of delivery {d.task_id} started; not committed") from None
        _send(d.bus, outbox)
        if outbox:
            d.bus.sync_client().hdel(key, "outbox")


def _send(bus: EventBus, outbox: list[tuple[str, str, str]]) -> None:
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
