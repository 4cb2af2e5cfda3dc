"""The event contract: names, the JSON envelope, and its strict decoding on the router side."""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any

import orjson
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
from project.observability.tracing import TraceFields, trace_fields

__all__ = [
    "Envelope",
    "decode_envelope",
    "encode_envelope",
    "new_event_id",
    "normalize_event_id",
    "validate_event_name",
]

SEGMENT = r"[a-z][a-z0-9_]*"
_NAME_RE = re.compile(rf"^{SEGMENT}(?:\.{SEGMENT}){{1,3}}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACEPARENT_LEN = 55  # version 00: 2 + 32 + 16 + 2 hex digits and 3 dashes
_MAX_NAME_CHARS = 255


@lru_cache(maxsize=4096)
def _valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME_CHARS and _NAME_RE.match(name) is not None


_known_names: set[str] = set()  # valid ones seen, a set: cheaper to look up than the cache


def validate_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise :class:`InvalidEventName`.

    A name is 2 to 4 dot-separated segments, each lower-case snake_case starting with a
    letter: ``user.created``, ``cosmic.solar_storm.detected``. Wildcards are for patterns.
    """
    if type(name) is str and name in _known_names:  # the names a process publishes are few
        return name
    if not isinstance(name, str):
        raise InvalidEventName(f"event name must be a str, got {type(name).__name__}")
    if not _valid_name(name):
        raise InvalidEventName(
            f"invalid event name {name[:80]!r}: expected 2 to 4 dot-separated lower-case "
            "snake_case segments such as 'user.created' or 'cosmic.solar_storm.detected'"
            + (" ('*' and '#' belong in subscription patterns)" if "*" in name or "#" in name else "")
        )
    if type(name) is str and len(_known_names) < 4096:
        _known_names.add(name)
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
    trace: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Build and encode a new event; return ``(event_id, envelope_json)``.

    ``contract`` (:meth:`project.contracts.Contracts.outgoing`) validates the data against
    the event type's model and gives the version stamped in the envelope. ``trace`` is the
    publishing span's context as envelope fields (:func:`~project.observability.tracing.trace_fields`);
    by default, the current span's.

    ``user_id`` given inside ``data`` is lifted into the envelope (and left in ``data``), so
    the application's ``publish(name, {..., "user_id": uid})`` works unchanged. Nothing
    accepted here is set aside later by the router, which decodes with :class:`Envelope`:
    an envelope that cheap checks cannot prove valid is checked with that model itself
    (see :func:`_encode_plain`).

    ``uuid.UUID`` and ``enum.Enum`` values in ``data`` are written as their string and value.

    Raises:
        InvalidEventName, InvalidEventData, PayloadNotSerializable, PayloadTooLarge,
        HopLimitExceeded.
    """
    validate_event_name(event_type)
    if data is None:
        data = {}
    elif type(data) is not dict and not isinstance(data, Mapping):
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
    if user_id is None or type(user_id) is int or type(user_id) is str:
        pass
    elif isinstance(user_id, uuid.UUID):
        user_id = str(user_id)
    elif not isinstance(user_id, str | int) or isinstance(user_id, bool):
        raise InvalidEventData(f"user_id must be a str, int or UUID, got {type(user_id).__name__}")

    cause = current_cause()
    if event_id is not None:
        event_id = normalize_event_id(event_id)
    if cause is None:
        event_id = event_id or new_event_id()
        causation_id, correlation_id, hops = None, event_id, 0
    else:
        event_id = event_id or cause.next_event_id() or new_event_id()
        causation_id, correlation_id, hops = cause.event_id, cause.correlation_id, cause.hops + 1
        if hops > max_hops:
            raise HopLimitExceeded(
                f"publishing {event_type!r} would be hop {hops} of the chain started by event "
                f"{correlation_id} (limit EVENTS_MAX_HOPS={max_hops}): is a handler re-publishing "
                "the event it handles?"
            )
        if module is None:
            module = cause.module
    if trace is None:
        trace = trace_fields()  # only inside a recorded span: the envelope stays as it was otherwise
    envelope = {
        "event_id": event_id,
        "event_type": event_type,
        "user_id": user_id,
        "data": data if type(data) is dict else dict(data),
        "timestamp": now_iso(),
        "module": module,
        "causation_id": causation_id,
        "correlation_id": correlation_id,
        "hops": hops,
        **({} if version is None else {"version": version}),
        **trace,
    }
    encoded = None
    chain_ok = cause is None or _chain_valid(causation_id, correlation_id, hops)
    if _plain_fields(user_id, module, chain_ok, version, trace):
        encoded = _encode_plain(envelope, max_bytes)
    if encoded is None:
        encoded = _encode_checked(envelope, event_type, max_bytes)
    return event_id, encoded


def new_event_id() -> str:
    """A random (version 4) UUID as a string, as ``str(uuid.uuid4())``.

    Made ahead, 128 at a time from one read of ``os.urandom`` (a system call, which on some
    virtual machines costs more than the rest of a publish): ``list.pop`` hands each to one
    caller only, whatever the thread, and a forked child drops the parent's (see below).
    """
    try:
        return _ids.pop()
    except IndexError:
        h, v = os.urandom(16 * _IDS_PER_READ).hex(), _VARIANT
        pieces = (h[i : i + 32] for i in range(0, len(h), 32))  # 32 random hex digits an id
        _ids.extend([f"{a[:8]}-{a[8:12]}-4{a[13:16]}-{v[a[16]]}{a[17:20]}-{a[20:]}" for a in pieces])
        return _ids.pop()


_IDS_PER_READ = 128
_ids: list[str] = []
# A child must not hand out the ids its parent made (they would be the parent's next ones).
os.register_at_fork(after_in_child=_ids.clear)


def now_iso() -> str:
    """The time now in UTC, in ISO 8601 with microseconds: ``2026-11-28T12:00:00.123456+00:00``.

    As ``datetime.now(UTC).isoformat()``, but for the microseconds always written, at a
    fifth of the cost: the date and time up to the second are formatted once a second.
    """
    global _second
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second  # one pair, assigned at once: a thread sees the old one or the new
    if cached[0] != second:
        cached = _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micro:06d}+00:00"


_second: tuple[int, str] = (-1, "")


# The variant bits (10xx) of a UUID's 17th hex digit, keeping its two random bits.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
_MAX_ID_CHARS = 200  # Envelope.user_id and Envelope.module


def _plain_fields(user_id: object, module: object, chain_ok: bool, version: object, trace: Mapping[str, str]) -> bool:
    """Whether the envelope's fields other than ``data`` are certainly as :class:`Envelope` wants.

    The event id, type, timestamp and hops are made valid by :func:`encode_envelope`; these
    are the ones that come from the caller. False sends the envelope through the model.
    """
    if user_id is not None:
        kind = type(user_id)
        if kind is str:
            if len(user_id) > _MAX_ID_CHARS:  # type: ignore[arg-type]
                return False
        elif kind is not int:  # a str or int subclass, or a bool: the model decides
            return False
    if module is not None and (type(module) is not str or len(module) > _MAX_ID_CHARS):
        return False
    if not chain_ok or (version is not None and (type(version) is not int or version < 1)):
        return False
    if trace:
        parent, state = trace.get("traceparent"), trace.get("tracestate")
        if parent is None or len(trace) != 1 + (state is not None):
            return False
        if type(trace) is TraceFields:  # written from a valid span context: only its flags can overflow
            if len(parent) != _TRACEPARENT_LEN:
                return False
        elif len(parent) > 256 or _TRACEPARENT_RE.match(parent) is None:
            return False
        if state is not None and len(state) > 1024:
            return False
    return True


def _chain_valid(causation_id: object, correlation_id: object, hops: object) -> bool:
    """Whether the chain fields taken from the cause (a handler's event) are valid."""
    if type(hops) is not int or hops < 0:
        return False
    return all(type(i) is str and _UUID_RE.fullmatch(i) is not None for i in (causation_id, correlation_id))


# orjson writes datetimes (and dates, times) and dataclasses by itself; the standard encoder
# refuses them, and so must this one, so they go to `default`, which refuses them too.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_NUL_BYTES = b"\\u0000"


def _encode_plain(envelope: dict[str, Any], max_bytes: int) -> str | None:
    """The envelope as JSON (UTF-8) if it is certainly valid, else None (:func:`_encode_checked` decides).

    The common case, and the cheap one: orjson writes the envelope and :class:`Envelope` is
    not run, since every field was checked already but for ``data``, which the model only
    wants to be a dict with string keys (orjson refuses any other key). What orjson cannot
    write, or writes differently from the standard encoder, returns None: a lone surrogate,
    an integer over 64 bits, a key that is no str, a type it does not know. NaN and Infinity,
    which orjson writes as null, are looked for only when the JSON holds more nulls than
    the envelope's own empty fields; and a NUL, only when its escape appears.
    """
    try:
        encoded = orjson.dumps(envelope, default=_refuse, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError included
        return None
    nulls = (envelope["user_id"] is None) + (envelope["module"] is None) + (envelope["causation_id"] is None)
    if encoded.count(b"null") > nulls and _has_non_finite(envelope["data"]):
        return None
    if len(encoded) > max_bytes or (b"\\" in encoded and _NUL_BYTES in encoded):  # a NUL: the model decides
        return None
    # Deeper than the router's parser reads: the model path refuses it. Each level opens a
    # bracket, so only JSON with that many brackets is walked.
    if encoded.count(b"[") + encoded.count(b"{") > MAX_DEPTH and _deeper_than(envelope, MAX_DEPTH):
        return None
    return encoded.decode()


def _encode_checked(envelope: dict[str, Any], event_type: str, max_bytes: int) -> str:
    """The envelope checked by :class:`Envelope` and written by the standard encoder (ASCII):
    the path of whatever :func:`_encode_plain` cannot prove valid, and so of every refusal.

    Raises:
        InvalidEventData, PayloadNotSerializable, PayloadTooLarge.
    """
    if _deeper_than(envelope, MAX_DEPTH):
        raise InvalidEventData(
            f"data of {event_type!r} is nested too deep: the envelope, its data and what the data holds "
            f"may be at most {MAX_DEPTH} objects and arrays deep, as the router reads them"
        )
    try:
        Envelope.model_validate(envelope)
    except ValidationError as exc:
        raise InvalidEventData(f"event {event_type!r} is not a valid envelope: {_reasons(exc)}") from None
    try:
        encoded = _ENCODER.encode(envelope)
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializable(f"data of {event_type!r} is not JSON-serialisable: {exc}") from exc
    if _NUL in encoded and _has_nul(envelope):
        raise InvalidEventData(
            f"event {event_type!r} holds a NUL character (U+0000) in a string; PostgreSQL cannot store it"
        )
    if _SURROGATE in encoded and _has_lone_surrogate(envelope):
        raise InvalidEventData(
            f"event {event_type!r} holds a lone surrogate (U+D800..U+DFFF) in a string, which is not "
            "valid Unicode: no JSON parser or PostgreSQL accepts it"
        )
    # Checked above in ASCII (the escapes show a NUL or a surrogate); stored, and measured, as
    # UTF-8, as the fast path writes it and the router measures it. Only an escape can differ.
    if "\\u" in encoded:
        encoded = _UTF8_ENCODER.encode(envelope)
    size = len(encoded.encode())
    if size > max_bytes:
        raise PayloadTooLarge(
            f"event {event_type!r} encodes to {size} bytes, over the limit of {max_bytes} "
            "(EVENTS_MAX_DATA_BYTES): carry IDs in events, not whole objects"
        )
    return encoded


#: How deep the router's JSON parser reads (pydantic's, at 200 levels): the envelope object
#: is the first level, its ``data`` the second.
MAX_DEPTH = 200


def _deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests dicts and lists (tuples) more than ``limit`` levels, itself the
    first; walked without recursion, and no further than ``limit + 1`` levels."""
    level: list[object] = [value]
    depth = 0
    while level:
        containers = [v for v in level if isinstance(v, Mapping | list | tuple)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [x for c in containers for x in (c.values() if isinstance(c, Mapping) else c)]
    return False


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


def _default(value: object) -> object:
    """What the standard encoder writes for a type it does not know: as orjson does, a UUID
    as its string and an enum member as its value; nothing else."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return _refuse(value)


# Built once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)
_UTF8_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default, ensure_ascii=False)


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
        pattern=_TRACEPARENT_RE.pattern,
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
