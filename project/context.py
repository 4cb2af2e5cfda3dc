"""The event a handler is running for, so that what it publishes carries the chain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Cause", "current_cause", "handling"]


@dataclass(frozen=True, slots=True)
class Cause:
    """The event being handled: what a publish made inside its handler descends from."""

    event_id: str
    correlation_id: str
    hops: int
    module: str | None = None


_cause: ContextVar[Cause | None] = ContextVar("eventbus_cause", default=None)


def current_cause() -> Cause | None:
    """Return the event the running handler was called for, or None outside handlers."""
    return _cause.get()


@contextmanager
def handling(envelope: dict[str, object], module: str | None) -> Iterator[Cause]:
    """Mark ``envelope`` as the cause of every event published inside the block."""
    event_id = str(envelope["event_id"])
    hops = envelope.get("hops")
    cause = Cause(
        event_id=event_id,
        correlation_id=str(envelope.get("correlation_id") or event_id),
        hops=hops if isinstance(hops, int) else 0,
        module=module,
    )
    token = _cause.set(cause)
    try:
        yield cause
    finally:
        _cause.reset(token)
