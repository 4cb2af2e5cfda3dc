"""Every exception the dispatcher raises on purpose derives from :class:`EventBusError`."""

from __future__ import annotations

__all__ = [
    "DuplicateHandler",
    "EventBusError",
    "HopLimitExceeded",
    "InvalidEventData",
    "InvalidEventName",
    "InvalidPattern",
    "InvalidSubscription",
    "MalformedEnvelope",
    "PayloadNotSerializable",
    "PayloadTooLarge",
]


class EventBusError(Exception):
    """Raised for any misuse or failure the dispatcher detects; the root of all its errors."""


class InvalidEventName(EventBusError, ValueError):
    """Raised when an event name is not 2 to 4 lower-case snake_case segments."""


class InvalidEventData(EventBusError, ValueError):
    """Raised when event data is not a JSON object, or contradicts the envelope (two user_ids)."""


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
