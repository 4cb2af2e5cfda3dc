"""The event a handler is running for, so that what it publishes carries the chain."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["Cause", "Outbox", "collecting", "current_cause", "current_outbox", "derived_event_id", "handling"]

# Fixed namespace: a handler that runs again publishes the same event ids.
_PUBLISH_NAMESPACE = uuid.UUID("0c3b7f0e-6a51-4f7e-8f2a-2f5d3c1e9a44")


@dataclass(slots=True)
class Cause:
    """The event being handled: what a publish made inside its handler descends from.

    With a ``delivery_id`` (the Celery task id of the delivery being run), the n-th event
    published inside gets an event id derived from (delivery_id, n): a handler that runs
    again after a crash or a retry publishes the same ids, and publish stores each once.
    """

    event_id: str
    correlation_id: str
    hops: int
    module: str | None = None
    delivery_id: str | None = None
    published: int = field(default=0)

    def next_event_id(self) -> str | None:
        """The id of the next event published in this handler run, or None for a random one."""
        if self.delivery_id is None:
            return None
        self.published += 1
        return derived_event_id(self.delivery_id, self.published)


def derived_event_id(delivery_id: str, n: int) -> str:
    """The id of the ``n``-th event (from 1) published by the handler run ``delivery_id``."""
    return str(uuid.uuid5(_PUBLISH_NAMESPACE, f"{delivery_id}/{n}"))


_cause: ContextVar[Cause | None] = ContextVar("eventbus_cause", default=None)


def current_cause() -> Cause | None:
    """Return the event the running handler was called for, or None outside handlers."""
    return _cause.get()


@contextmanager
def handling(envelope: dict[str, object], module: str | None, delivery_id: str | None = None) -> Iterator[Cause]:
    """Mark ``envelope`` as the cause of every event published inside the block.

    ``delivery_id`` (a task id) makes the ids of those events deterministic; see :class:`Cause`.
    """
    event_id = str(envelope["event_id"])
    hops = envelope.get("hops")
    cause = Cause(
        event_id=event_id,
        correlation_id=str(envelope.get("correlation_id") or event_id),
        hops=hops if isinstance(hops, int) else 0,
        module=module,
        delivery_id=delivery_id,
    )
    token = _cause.set(cause)
    try:
        yield cause
    finally:
        _cause.reset(token)


Outbox = list[tuple[str, str, str]]  # (event_type, event_id, envelope JSON)
_outbox: ContextVar[Outbox | None] = ContextVar("eventbus_outbox", default=None)


def current_outbox() -> Outbox | None:
    """Where publishes go while an exactly-once block is open (sent after its commit), or None."""
    return _outbox.get()


@contextmanager
def collecting(outbox: Outbox) -> Iterator[Outbox]:
    """Keep the events published inside the block in ``outbox`` instead of sending them."""
    token = _outbox.set(outbox)
    try:
        yield outbox
    finally:
        _outbox.reset(token)
