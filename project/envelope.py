"""The event contract: names, the JSON envelope, and its strict decoding on the router side."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from project.context import current_cause
from project.errors import (
    HopLimitExceeded,
    InvalidEventData,
    InvalidEventName,
    MalformedEnvelope,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from project.observability.tracing import trace_fields

__all__ = ["Envelope", "decode_envelope", "encode_envelope", "normalize_event_id", "validate_event_name"]

SEGMENT = r"[a-z][a-z0-9_]*"
_NAME_RE = re.compile(rf"^{SEGMENT}(?:\.{SEGMENT}){{1,3}}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_MAX_NAME_CHARS = 255


@lru_cache(maxsize=4096)
def _valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME_CHARS and _NAME_RE.match(name) is not None


def validate_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise :class:`InvalidEventName`.

    A name is 2 to 4 dot-separated segments, each lower-case snake_case starting with a
    letter: ``user.created``, ``cosmic.solar_storm.detected``. Wildcards are for patterns.
    """
    if not isinstance(name, str):
        raise InvalidEventName(f"event name must be a str, got {type(name).__name__}")
    if not _valid_name(name):
        raise InvalidEventName(
            f"invalid event name {name[:80]!r}: expected 2 to 4 dot-separated lower-case "
            "snake_case segments such as 'user.created' or 'cosmic.solar_storm.detected'"
            + (" ('*' and '#' belong in subscription patterns)" if "*" in name or "#" in name else "")
        )
    return name


def normalize_event_id(event_id: object) -> str:
    """Return ``event_id`` as a canonical lower-case UUID string, or raise :class:`InvalidEventData`."""
    if isinstance(event_id, uuid.UUID):
        return str(event_id)
    if isinstance(event_id, str):
        try:
            return str(uuid.UUID(event_id))
        except ValueError:
            pass
    raise InvalidEventData(f"event_id must be a UUID (a str or uuid.UUID), got {event_id!r:.80}")


def encode_envelope(
    event_type: str,
    data: Mapping[str, Any] | None,
    *,
    user_id: str | int | uuid.UUID | None,
    module: str | None,
    max_bytes: int,
    max_hops: int,
    event_id: str | uuid.UUID | None = None,
    contract: Callable[[str, Mapping[str, Any]], tuple[dict[str, Any], int | None]] | None = None,
) -> tuple[str, str]:
    """Build and encode a new event; return ``(event_id, envelope_json)``.

    ``contract`` (:meth:`project.contracts.Contracts.outgoing`) validates the data against
    the event type's model and gives the version stamped in the envelope.

    ``user_id`` given inside ``data`` is lifted into the envelope (and left in ``data``), so
    the application's ``publish(name, {..., "user_id": uid})`` works unchanged. The envelope
    is checked with :class:`Envelope`, the model the router decodes with, so nothing accepted
    here is set aside later.

    Raises:
        InvalidEventName, InvalidEventData, PayloadNotSerializable, PayloadTooLarge,
        HopLimitExceeded.
    """
    validate_event_name(event_type)
    if data is None:
        data = {}
    elif not isinstance(data, Mapping):
        raise InvalidEventData(f"event data must be a dict (a JSON object), got {type(data).__name__}")
    if "user_id" in data:
        inner = data["user_id"]
        if user_id is None:
            user_id = inner
        elif inner is not None and str(inner) != str(user_id):
            raise InvalidEventData(f"user_id={user_id!r} contradicts data['user_id']={inner!r}; give one of them")
    version = None
    if contract is not None:
        data, version = contract(event_type, data)
    if isinstance(user_id, uuid.UUID):
        user_id = str(user_id)
    elif user_id is not None and (not isinstance(user_id, str | int) or isinstance(user_id, bool)):
        raise InvalidEventData(f"user_id must be a str, int or UUID, got {type(user_id).__name__}")

    cause = current_cause()
    if event_id is not None:
        event_id = normalize_event_id(event_id)
    if cause is None:
        event_id = event_id or str(uuid.uuid4())
        causation_id, correlation_id, hops = None, event_id, 0
    else:
        event_id = event_id or cause.next_event_id() or str(uuid.uuid4())
        causation_id, correlation_id, hops = cause.event_id, cause.correlation_id, cause.hops + 1
        if hops > max_hops:
            raise HopLimitExceeded(
                f"publishing {event_type!r} would be hop {hops} of the chain started by event "
                f"{correlation_id} (limit EVENTS_MAX_HOPS={max_hops}): is a handler re-publishing "
                "the event it handles?"
            )
        if module is None:
            module = cause.module
    envelope = {
        "event_id": event_id,
        "event_type": event_type,
        "user_id": user_id,
        "data": data if type(data) is dict else dict(data),
        "timestamp": datetime.now(UTC).isoformat(),
        "module": module,
        "causation_id": causation_id,
        "correlation_id": correlation_id,
        "hops": hops,
        **({} if version is None else {"version": version}),
        **trace_fields(),  # only inside a recorded span: the envelope stays as it was otherwise
    }
    try:
        Envelope.model_validate(envelope)
    except ValidationError as exc:
        raise InvalidEventData(f"event {event_type!r} is not a valid envelope: {_reasons(exc)}") from None
    try:
        encoded = _ENCODER.encode(envelope)
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializable(f"data of {event_type!r} is not JSON-serialisable: {exc}") from exc
    if len(encoded) > max_bytes:  # ASCII-only (ensure_ascii), so characters are bytes
        raise PayloadTooLarge(
            f"event {event_type!r} encodes to {len(encoded)} bytes, over the limit of {max_bytes} "
            "(EVENTS_MAX_DATA_BYTES): carry IDs in events, not whole objects"
        )
    if _NUL in encoded and _has_nul(envelope):
        raise InvalidEventData(
            f"event {event_type!r} holds a NUL character (U+0000) in a string; PostgreSQL cannot store it"
        )
    if _SURROGATE in encoded and _has_lone_surrogate(envelope):
        raise InvalidEventData(
            f"event {event_type!r} holds a lone surrogate (U+D800..U+DFFF) in a string, which is not "
            "valid Unicode: no JSON parser or PostgreSQL accepts it"
        )
    return event_id, encoded


# A NUL inside any JSON string is encoded as this escape (ensure_ascii): a cheap pre-check
# before the exact walk, which only runs when the escape text appears.
_NUL = "\\u0000"


# Surrogates are encoded as \\ud800-\\udfff escapes: this text appears for every one, paired
# (an emoji) or lone; only then is the exact check run.
_SURROGATE = "\\ud"


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _reasons(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5])


def _refuse(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# Built once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_refuse)


class Envelope(BaseModel):
    """An event as the router accepts it: every field checked, nothing unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    event_id: str = Field(pattern=_UUID_RE.pattern, description="The event's id, a UUID made by publish.")
    event_type: str = Field(description="The event's name: 2 to 4 lower-case snake_case segments.")
    user_id: Annotated[str, StringConstraints(max_length=200)] | int | None = Field(
        default=None, description="The user the event concerns; null for a global event."
    )
    data: dict[str, Any] = Field(description="The event's data: its contract's model, if it has one.")
    timestamp: str = Field(description="When it was published (ISO-8601, UTC).")
    module: str | None = Field(default=None, max_length=200, description="The module that published it.")
    causation_id: str | None = Field(
        default=None, pattern=_UUID_RE.pattern, description="The event whose handler published this one."
    )
    correlation_id: str | None = Field(
        default=None, pattern=_UUID_RE.pattern, description="The root event of the chain."
    )
    hops: int = Field(default=0, ge=0, description="How many handlers the chain went through before this event.")
    # The contract version the data was published as (project.contracts); absent for an
    # event type without a contract, and in envelopes from before contracts existed.
    version: int | None = Field(default=None, ge=1, description="The contract version the data was published as.")
    # Set on the copy of a past event that `eventbus replay` delivers again: the original's id.
    replay_of: str | None = Field(
        default=None, pattern=_UUID_RE.pattern, description="On a replayed copy: the original event's id."
    )
    # The W3C trace context of the publishing span (project.observability.tracing); optional,
    # so envelopes of earlier versions and untraced publishers are accepted as they are.
    traceparent: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}",
        max_length=256,
        description="The publishing span's W3C trace context.",
    )
    tracestate: str | None = Field(default=None, max_length=1024, description="W3C tracestate, with traceparent.")

    @field_validator("event_type")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return validate_event_name(value)

    @field_validator("timestamp")
    @classmethod
    def _check_timestamp(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("timestamp is not ISO-8601") from None
        return value


def decode_envelope(raw: bytes | str, max_bytes: int) -> Envelope:
    """Decode and validate one stream entry; raise :class:`MalformedEnvelope` with the reason."""
    if len(raw) > max_bytes:
        raise MalformedEnvelope(f"entry is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        envelope = Envelope.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedEnvelope(_reasons(exc)) from None
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    if _NUL in text and _has_nul(envelope.model_dump()):
        raise MalformedEnvelope("a string holds a NUL character (U+0000), which PostgreSQL cannot store")
    # pydantic's JSON parser takes NaN and Infinity, which are not JSON: PostgreSQL refuses them.
    if ("NaN" in text or "Infinity" in text) and _has_non_finite(envelope.data):
        raise MalformedEnvelope("a number is NaN or Infinity, which is not JSON (PostgreSQL cannot store it)")
    return envelope


def _has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False
