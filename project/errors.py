"""Every exception the dispatcher raises on purpose derives from :class:`EventBusError`."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "ContractViolation",
    "DeliveryExhausted",
    "DuplicateHandler",
    "EventBusError",
    "HopLimitExceeded",
    "InvalidContract",
    "InvalidEventData",
    "InvalidEventName",
    "InvalidPattern",
    "InvalidSubscription",
    "MalformedEnvelope",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PublishOutcomeUnknown",
    "PublishRefused",
]


class EventBusError(Exception):
    """Raised for any misuse or failure the dispatcher detects; the root of all its errors."""


class ConfigurationError(EventBusError, ValueError):
    """Raised when settings that each look valid cannot work together (a Redis Cluster with
    Celery's queues in Redis)."""


class InvalidEventName(EventBusError, ValueError):
    """Raised when an event name is not 2 to 4 lower-case snake_case segments."""


class InvalidEventData(EventBusError, ValueError):
    """Raised when event data is not a JSON object, contradicts the envelope (two user_ids),
    or does not satisfy its event type's contract.

    ``errors`` lists pydantic's errors (``loc``, ``msg``, ``type``) when a contract refused
    the data, so a caller can tell which field; the message names them too.
    """

    def __init__(self, message: str, *, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    def __reduce__(self) -> Any:  # picklable across Celery's processes, errors included
        return (_rebuild, (type(self), self.args, {"errors": self.errors}))


class InvalidContract(EventBusError, ValueError):
    """Raised when an event contract or upcaster is declared wrongly (a version taken twice,
    a model that is no pydantic model, a handler annotated ``Event[X]`` with no model)."""


class ContractViolation(EventBusError, ValueError):
    """Raised on a worker when an event's data cannot become the model its handler is
    annotated with (after upcasting). The delivery is ``dead`` at once: no retry would help."""


class InvalidPattern(EventBusError, ValueError):
    """Raised when a subscription pattern is malformed or can never match an event name."""


class InvalidSubscription(EventBusError, ValueError):
    """Raised when a subscription gets an unknown option or a value it cannot use."""


class DuplicateHandler(EventBusError, ValueError):
    """Raised when a handler (by its task name) is subscribed a second time."""


class PayloadNotSerializable(EventBusError, TypeError):
    """Raised when event data (or user_id) cannot be encoded as JSON."""


class PayloadTooLarge(EventBusError, ValueError):
    """Raised when an encoded event is larger than ``EVENTS_MAX_DATA_BYTES``."""


class HopLimitExceeded(EventBusError, RuntimeError):
    """Raised when publishing from a handler would exceed ``EVENTS_MAX_HOPS`` (an event loop)."""


class MalformedEnvelope(EventBusError, ValueError):
    """Raised when a stream entry cannot be decoded into a valid envelope (router side)."""


class PublishRefused(EventBusError, RuntimeError):
    """Raised when Redis refused to store an event (out of memory under ``noeviction``,
    a read-only replica, ...): nothing was stored, and retrying later is safe."""


class PublishOutcomeUnknown(EventBusError, ConnectionError):
    """Raised when the connection broke while publishing, so the event may or may not be
    stored. Publish again with ``event_id=exc.event_id``: it is never stored twice."""

    def __init__(self, message: str, event_id: str) -> None:
        super().__init__(message)
        self.event_id = event_id

    def __reduce__(self) -> Any:
        return (type(self), (*self.args, self.event_id))


class DeliveryExhausted(EventBusError, RuntimeError):
    """Raised on a worker for a delivery that has used all its attempts without finishing
    (its process was killed or timed out each time); the delivery is then ``dead``."""


def _rebuild(cls: type[Exception], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    return cls(*args, **kwargs)
