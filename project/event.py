"""The event a handler receives: the envelope as a plain dict, plus the exactly-once helpers.

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
exactly once too. The helpers live in :mod:`project.inbox`, imported on first use, so a
worker whose handlers never use them loads no SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    import sqlalchemy as sa

    from project.bus import EventBus

__all__ = ["AlreadyHandled", "Event", "LeaseLost"]


class AlreadyHandled(BaseException):
    """Raised out of a helper block when this delivery's effect was committed before; the
    delivery task catches it and counts the delivery as succeeded. Control flow, not an
    error: a BaseException, so a handler's ``except Exception`` cannot swallow it."""


class LeaseLost(Exception):
    """Raised when another copy of the delivery started while this one ran (its lease lapsed):
    the effect is not committed here, and the delivery is retried."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which delivery a handler is running: the bus, the task id and the handler's name."""

    bus: EventBus
    task_id: str
    handler: str


class Event(dict[str, Any]):
    """The envelope a handler receives: a plain dict, plus the exactly-once helpers."""

    __slots__ = ("delivery",)

    def __init__(self, envelope: dict[str, Any], delivery: Delivery) -> None:
        super().__init__(envelope)
        self.delivery = delivery

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
        from project.inbox import sql_transaction

        with sql_transaction(self, engine) as conn:
            yield conn

    @contextmanager
    def redis_transaction(self) -> Iterator[redis.client.Pipeline]:
        """A Redis MULTI/EXEC whose commands run once per delivery, with its done mark.

        Yields a redis-py pipeline (transaction mode) on the bus's Redis; queue commands on
        it. On leaving the block they run in one MULTI/EXEC together with the mark that
        makes every later copy of the delivery skip. Events published inside are sent after.

        Raises:
            LeaseLost: another copy started meanwhile; nothing was committed here.
        """
        from project.inbox import redis_transaction

        with redis_transaction(self) as pipe:
            yield pipe
