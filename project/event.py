"""The event a handler receives: the envelope as a plain dict, plus the exactly-once helpers.

A plain handler runs at least once: never twice in parallel, never again once its success is
recorded, but a worker killed after the handler's effect and before that record runs it
again. A handler that writes through one of these helpers has its effect exactly once:

- ``with event.transaction() as conn:`` (PostgreSQL) inserts the delivery into
  ``delivery_inbox`` in the same transaction as the handler's writes; a copy that finds the
  row skips the rest of its handler (the inbox pattern).
- ``with event.redis_transaction() as pipe:`` (Redis) queues the handler's commands in one
  MULTI/EXEC with the delivery's done mark; a copy that finds the mark is skipped on start,
  or, started already, stops at the block.

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
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

if TYPE_CHECKING:
    import redis
    import sqlalchemy as sa

    from project.bus import EventBus

__all__ = ["AlreadyHandled", "Event", "LeaseLost"]

# Unparametrised, ``Event`` is ``Event[dict[str, Any]]``: a handler without a contract.
DataT = TypeVar("DataT", default=dict[str, Any])


class AlreadyHandled(BaseException):
    """Raised out of a helper block when this delivery's effect was committed before; the
    delivery task catches it and counts the delivery as succeeded. Control flow, not an
    error: a BaseException, so a handler's ``except Exception`` cannot swallow it."""


class LeaseLost(Exception):
    """Raised when another copy of the delivery started while this one ran (its lease lapsed):
    the effect is not committed here, and the delivery is retried."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which delivery a handler is running: the bus, the task id and the handler's name.

    ``recorded`` is False in the test kit (:mod:`project.testing`): there is no delivery
    record, so the exactly-once helpers keep their transaction and the after-commit sending
    of events, without the inbox row or the done mark.
    """

    bus: EventBus
    task_id: str
    handler: str
    recorded: bool = True


class Event(dict[str, Any], Generic[DataT]):
    """The envelope a handler receives: a plain dict, plus typed access and the exactly-once helpers.

    ``event["data"]`` is the data as a dict, as it always was. A handler annotated
    ``event: Event[SolarStormDetected]`` (a declared contract, :mod:`project.contracts`) gets
    ``event.data`` as that model, validated (and upcast from an older version) on the
    worker; unannotated, ``event.data`` is the dict. The envelope's fields are attributes
    too: ``event.event_id``, ``event.user_id``, ``event.event_type``...
    """

    __slots__ = ("_model", "delivery")

    def __init__(self, envelope: dict[str, Any], delivery: Delivery | None, model: Any = None) -> None:
        super().__init__(envelope)
        self.delivery = delivery
        self._model = model

    @classmethod
    def for_handler(cls, envelope: dict[str, Any], delivery: Delivery | None, model: Any = None) -> Event[Any]:
        """The event a handler receives: with ``model`` (its ``Event[Model]`` annotation), the
        data upcast and validated into it.

        Raises:
            ContractViolation: the data cannot become ``model``.
        """
        if model is None:
            return cls(envelope, delivery)
        from project.contracts import contracts

        instance, data = contracts.incoming(envelope, model)
        if data is not envelope.get("data"):  # upcast: the dict shows the same version as the model
            envelope = {**envelope, "data": data}
            version = contracts.for_model(model)
            if version is not None:
                envelope["version"] = version.version
        return cls(envelope, delivery, instance)

    @property
    def data(self) -> DataT:
        """The data: the handler's contract model if it is annotated with one, else the dict."""
        return self["data"] if self._model is None else self._model  # type: ignore[no-any-return]

    @property
    def event_id(self) -> str:
        """The event's id (a UUID string)."""
        return str(self["event_id"])

    @property
    def event_type(self) -> str:
        """The event's name, ``scope.name[.detail]``."""
        return str(self["event_type"])

    @property
    def user_id(self) -> str | int | None:
        """The user the event concerns, or None for a global event."""
        return self.get("user_id")  # type: ignore[no-any-return]

    @property
    def module(self) -> str | None:
        """The module that published it."""
        return self.get("module")  # type: ignore[no-any-return]

    @property
    def timestamp(self) -> str:
        """When it was published (ISO-8601, UTC)."""
        return str(self["timestamp"])

    @property
    def correlation_id(self) -> str:
        """The id of the chain's root event."""
        return str(self.get("correlation_id") or self["event_id"])

    @property
    def causation_id(self) -> str | None:
        """The id of the event whose handler published this one, or None for a root event."""
        return self.get("causation_id")  # type: ignore[no-any-return]

    @property
    def hops(self) -> int:
        """How many handlers the chain went through before this event (0 for a root)."""
        return int(self.get("hops") or 0)

    @property
    def version(self) -> int | None:
        """The contract version it was published as, or None (an untyped event)."""
        return self.get("version")  # type: ignore[no-any-return]

    def _delivery(self) -> Delivery:
        if self.delivery is None:
            raise RuntimeError("this event is not being delivered to a handler: it has no delivery")
        return self.delivery

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

    def redis_key(self, name: str) -> str:
        """The name of a key of the handler's own that :meth:`redis_transaction` may write.

        ``<prefix>:<name>`` in one Redis. On a Redis Cluster ``{<prefix>:<scope>}:<name>``: in
        the slot of the delivery's done mark, which a MULTI/EXEC must share with every key it
        writes. In one Redis, a transaction may write any key.
        """
        return f"{self._delivery().bus.keys.scoped(self.event_type).prefix}:{name}"

    @contextmanager
    def redis_transaction(self) -> Iterator[redis.client.Pipeline]:
        """A Redis MULTI/EXEC whose commands run once per delivery, with its done mark.

        Yields a redis-py pipeline (transaction mode) on the bus's Redis; queue commands on
        it. On leaving the block they run in one MULTI/EXEC together with the mark that
        makes every later copy of the delivery skip. Events published inside are sent after.
        On a Redis Cluster, the keys written must be named by :meth:`redis_key`.

        Raises:
            LeaseLost: another copy started meanwhile; nothing was committed here.
            AlreadyHandled: the delivery's effect committed before; the handler stops here.
        """
        from project.inbox import redis_transaction

        with redis_transaction(self) as pipe:
            yield pipe
