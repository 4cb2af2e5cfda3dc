"""CloudEvents 1.0: an event's envelope as a structured-mode CloudEvent (JSON), and back.

======================================  ========================================================
envelope                                CloudEvent (structured mode, JSON)
======================================  ========================================================
(always)                                ``specversion`` ``"1.0"``, ``datacontenttype``
                                        ``"application/json"``
``event_id``                            ``id``
``event_type``                          ``type``, as it is (``user.birth_data.updated``)
``module``                              ``source``; see below
``timestamp``                           ``time`` (RFC 3339)
``user_id``                             ``subject``; see below
``version`` (a contract's)              ``dataschema``: ``urn:eventbus:contract:<type>:v<N>``
                                        (:func:`project.contracts.dataschema_uri`); absent for
                                        an untyped event
``correlation_id``, ``causation_id``    extensions ``correlationid``, ``causationid`` (omitted
                                        when null)
``hops``                                extension ``hops``, an Integer
``traceparent``, ``tracestate``         the same names: the CloudEvents distributed-tracing
                                        extension
``data``                                ``data``, a JSON object
======================================  ========================================================

Decisions:

- ``source``. A module's name becomes ``urn:eventbus:module:<name>``, percent-encoded, so
  any name is a valid URI-reference; no module becomes ``urn:eventbus``. A module that is
  itself an absolute URI (the ``source`` of a CloudEvent published from outside, say
  ``https://shop.example/orders``) is the ``source`` as it is, unless it begins with
  ``urn:eventbus`` (in any case), which is then encoded like any other name. Read back,
  ``urn:eventbus`` is no module, ``urn:eventbus:module:<name>`` is the decoded name, and
  any other ``source`` is the module as it is: a CloudEvent from outside keeps its
  ``source`` as its module, so ``eventbus tail --format cloudevents`` shows it unchanged.
- ``subject``. CloudEvents makes the subject a string, and a ``user_id`` is an int or a
  str. The subject is ``str(user_id)``; read back, a subject written as a canonical
  integer (``42``, ``-7``, not ``007``) is an int and anything else a str. A str user id
  that reads as an integer (``"42"``) adds the extension ``useridtype: "str"``, so it comes
  back a str; ``useridtype: "int"`` may be given too. An empty user id (``""``), which
  cannot be a subject (it must not be empty), is ``useridtype: "str"`` with no subject. No
  user id: neither attribute.
- ``id``. An ``id`` that is a canonical UUID (lower-case, hyphenated: every event this bus
  publishes) is the ``event_id``. Any other ``id`` becomes the UUID 5 of (``source``,
  ``id``) (:func:`derive_event_id`): publishing the same CloudEvent twice stores it once,
  since publish is idempotent per ``event_id``. ``correlationid`` and ``causationid`` are
  read the same way, so a chain of CloudEvents from one source keeps its links.
- ``time``. The timestamp is the ``time`` as it is when it is RFC 3339 already (every
  timestamp this bus makes), otherwise it is written in UTC. Publishing a CloudEvent
  stamps the time it is stored, as every publish does; :func:`envelope_from_cloudevent`
  keeps the ``time``.
- Reading is lenient where transports differ: ``hops`` may be a decimal string (every
  attribute is a string in HTTP binary mode), an optional attribute that is ``null`` is
  absent, and ``data`` absent is ``{}``. Extension attributes other than those above are
  accepted and dropped: an envelope has nowhere to keep them. Binary data
  (``data_base64``) and a ``datacontenttype`` that is not JSON are refused: an event's data
  is a JSON object.

Nothing here needs the ``cloudevents`` SDK; the tests check these functions against it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ValidationError

from project.context import handling
from project.contracts import contracts, dataschema_uri, load_contract_modules, parse_dataschema
from project.envelope import Envelope, validate_event_name
from project.errors import InvalidEventData, InvalidEventName

if TYPE_CHECKING:
    from project.bus import EventBus

__all__ = [
    "CONTENT_TYPE",
    "SPECVERSION",
    "InboundEvent",
    "derive_event_id",
    "envelope_from_cloudevent",
    "from_cloudevent",
    "publish_cloudevent",
    "to_cloudevent",
]

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"

_NO_MODULE = "urn:eventbus"
_MODULE_PREFIX = "urn:eventbus:module:"
# Fixed: the event_id derived from a CloudEvent's (source, id) must be the same in every
# process and release, or publishing the same CloudEvent again would store it twice.
_ID_NAMESPACE = uuid.UUID("a2fcfd63-2a4f-4935-aefa-71fa6091b5b5")

# Matched whole (fullmatch): "$" would let a trailing newline through.
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_INT_RE = re.compile(r"0|-?[1-9][0-9]*")
_ABSOLUTE_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+")
_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_ATTRIBUTE_NAME_RE = re.compile(r"[a-z0-9]+")
_JSON_CONTENT_TYPE_RE = re.compile(r"(application|text)/([a-z0-9.+-]+\+)?json(\s*;.*)?", re.IGNORECASE)
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_MODULE_CHARS = 200  # Envelope.module
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """A CloudEvent read for publishing: the arguments of ``publish`` and the chain it continues.

    ``causation_id``, ``correlation_id`` and ``hops`` are the ones the published envelope
    will carry: a root event (no ``causationid``) has ``correlation_id == event_id`` and
    ``hops == 0``.
    """

    event_type: str
    data: dict[str, Any]
    event_id: str
    user_id: str | int | None
    module: str | None
    version: int | None
    causation_id: str | None
    correlation_id: str | None
    hops: int | None
    time: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


def derive_event_id(source: str, cloudevent_id: str) -> str:
    """The ``event_id`` of a CloudEvent: its ``id`` if that is a canonical UUID, else the
    UUID 5 of (``source``, ``id``), the same in every process."""
    if _UUID_RE.fullmatch(cloudevent_id):
        return cloudevent_id
    return str(uuid.uuid5(_ID_NAMESPACE, json.dumps([source, cloudevent_id])))


def to_cloudevent(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``envelope`` as a structured-mode CloudEvent 1.0: a JSON-ready dict.

    Raises:
        InvalidEventData: ``envelope`` is not a valid envelope (:class:`~project.envelope.Envelope`).
    """
    if not isinstance(envelope, Mapping):
        raise InvalidEventData(f"an envelope is a JSON object, got {type(envelope).__name__}")
    try:
        env = Envelope.model_validate(dict(envelope))
    except ValidationError as exc:
        raise InvalidEventData(f"not a valid envelope: {_reasons(exc)}") from None
    cloudevent: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": env.event_id,
        "type": env.event_type,
        "source": _source(env.module),
    }
    if env.user_id is not None:
        subject = str(env.user_id)
        if subject:
            cloudevent["subject"] = subject
        if isinstance(env.user_id, str) and (not subject or _INT_RE.fullmatch(subject)):
            cloudevent["useridtype"] = "str"
    cloudevent["time"] = _rfc3339(env.timestamp)
    cloudevent["datacontenttype"] = CONTENT_TYPE
    if env.version is not None:
        cloudevent["dataschema"] = dataschema_uri(env.event_type, env.version)
    if env.correlation_id is not None:
        cloudevent["correlationid"] = env.correlation_id
    if env.causation_id is not None:
        cloudevent["causationid"] = env.causation_id
    cloudevent["hops"] = env.hops
    if env.traceparent is not None:
        cloudevent["traceparent"] = env.traceparent
    if env.tracestate is not None:
        cloudevent["tracestate"] = env.tracestate
    cloudevent["data"] = env.data
    return cloudevent


def from_cloudevent(cloudevent: Mapping[str, Any]) -> InboundEvent:
    """Read a structured-mode CloudEvent 1.0 (a parsed JSON object) for publishing.

    Without ``causationid`` the event is a root: its ``correlationid``, if any, must be
    its own id, and ``hops`` 0. With ``causationid``, a missing ``correlationid`` or
    ``hops`` takes the cause for a root (correlation = the cause, hop 1).

    Raises:
        InvalidEventData: not a CloudEvent 1.0 this bus can publish; the message says which
            attribute and why.
    """
    event = _read(cloudevent)
    causation_id, correlation_id, hops = event.causation_id, event.correlation_id, event.hops
    if causation_id is None:
        if hops not in (None, 0):
            raise InvalidEventData(
                f"CloudEvent {event.event_id}: hops {hops} without causationid: an event past hop 0 "
                "names the event that caused it in causationid"
            )
        if correlation_id not in (None, event.event_id):
            raise InvalidEventData(
                f"CloudEvent {event.event_id}: correlationid without causationid must be the event's "
                "own id (a root event starts its chain); give causationid, the event this one was caused by"
            )
        correlation_id, hops = event.event_id, 0
    else:
        if hops == 0:
            raise InvalidEventData(
                f"CloudEvent {event.event_id}: hops 0 with causationid: an event caused by another is at least hop 1"
            )
        correlation_id = correlation_id or causation_id
        hops = 1 if hops is None else hops
    return InboundEvent(
        event_type=event.event_type,
        data=event.data,
        event_id=event.event_id,
        user_id=event.user_id,
        module=event.module,
        version=event.version,
        causation_id=causation_id,
        correlation_id=correlation_id,
        hops=hops,
        time=event.time,
        traceparent=event.traceparent,
        tracestate=event.tracestate,
    )


def envelope_from_cloudevent(cloudevent: Mapping[str, Any]) -> dict[str, Any]:
    """Return the envelope a CloudEvent stands for, exactly: the inverse of :func:`to_cloudevent`.

    ``to_cloudevent(envelope_from_cloudevent(ce)) == ce`` for every ``ce`` made by
    :func:`to_cloudevent`. Unlike :func:`from_cloudevent` it checks no chain rule: the
    envelope is rebuilt as it is, and needs a ``time``.

    Raises:
        InvalidEventData: not a CloudEvent 1.0, no ``time``, or not a valid envelope.
    """
    event = _read(cloudevent)
    if event.time is None:
        raise InvalidEventData(f"CloudEvent {event.event_id}: attribute 'time' is missing; an envelope needs its time")
    envelope: dict[str, Any] = {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "user_id": event.user_id,
        "data": event.data,
        "timestamp": _timestamp(event.time),
        "module": event.module,
        "causation_id": event.causation_id,
        "correlation_id": event.correlation_id,
        "hops": 0 if event.hops is None else event.hops,
    }
    if event.version is not None:
        envelope["version"] = event.version
    if event.traceparent is not None:
        envelope["traceparent"] = event.traceparent
    if event.tracestate is not None:
        envelope["tracestate"] = event.tracestate
    try:
        Envelope.model_validate(envelope)
    except ValidationError as exc:
        raise InvalidEventData(f"CloudEvent {event.event_id} is not a valid envelope: {_reasons(exc)}") from None
    return envelope


def publish_cloudevent(bus: EventBus, cloudevent: Mapping[str, Any]) -> str:
    """Publish a structured-mode CloudEvent 1.0 on ``bus``; return its ``event_id``.

    The event continues the chain the CloudEvent names (``causationid``,
    ``correlationid``, ``hops``) and the trace of its ``traceparent``. A ``dataschema``
    naming a contract version validates the data against that version's model; without
    one, publish validates against the type's latest contract, as for any dict. Publishing
    the same CloudEvent again stores nothing new (the ``event_id`` is derived from it).
    Called inside a handler, a CloudEvent without ``causationid`` continues the handled
    event's chain, as any publish does.

    Raises:
        InvalidEventData: see :func:`from_cloudevent`; or the data does not satisfy the
            contract, or names a contract version this process does not declare.
        Any error of :meth:`~project.bus.EventBus.publish`.
    """
    event = from_cloudevent(cloudevent)
    payload: str | BaseModel = event.event_type
    data: Mapping[str, Any] | None = event.data
    if event.version is not None:
        payload, data = _model_instance(bus, event.event_type, event.version, event.data), None
    with _continuing(event):
        return bus.publish_sync(payload, data, user_id=event.user_id, module=event.module, event_id=event.event_id)


# -- reading ----------------------------------------------------------------------------


def _read(cloudevent: Mapping[str, Any]) -> InboundEvent:
    """Every attribute checked and mapped; the chain fields as given (None when absent)."""
    if not isinstance(cloudevent, Mapping):
        extra = " (a batch? publish its events one at a time)" if isinstance(cloudevent, list) else ""
        raise InvalidEventData(f"a structured-mode CloudEvent is a JSON object, got {type(cloudevent).__name__}{extra}")
    specversion = cloudevent.get("specversion")
    if specversion is None:
        raise InvalidEventData("not a CloudEvent: attribute 'specversion' is missing (expected '1.0')")
    if specversion != SPECVERSION:
        raise InvalidEventData(
            f"CloudEvents specversion {specversion!r} is not supported: only CloudEvents 1.0 ('1.0') is"
        )
    for name in cloudevent:
        if name not in ("data", "data_base64") and not (isinstance(name, str) and _ATTRIBUTE_NAME_RE.fullmatch(name)):
            raise InvalidEventData(
                f"CloudEvent attribute name {name!r} is not valid: attribute names are lower-case letters and digits"
            )
    cloudevent_id = _required(cloudevent, "id")
    source = _required(cloudevent, "source")
    cloudevent_type = _required(cloudevent, "type")
    try:
        event_type = validate_event_name(cloudevent_type)
    except InvalidEventName as exc:
        raise InvalidEventData(f"CloudEvent attribute 'type': {exc}") from None

    content_type = _optional(cloudevent, "datacontenttype")
    if content_type is not None and not _JSON_CONTENT_TYPE_RE.fullmatch(content_type):
        raise InvalidEventData(
            f"CloudEvent datacontenttype {content_type!r} is not JSON: an event's data is a JSON object "
            f"({CONTENT_TYPE!r})"
        )
    if "data_base64" in cloudevent:
        raise InvalidEventData(
            "CloudEvent carries binary data (data_base64): an event's data is a JSON object, given in 'data'"
        )
    data = cloudevent.get("data", {})
    if not isinstance(data, Mapping):
        shown = "null" if data is None else type(data).__name__
        raise InvalidEventData(f"CloudEvent data must be a JSON object, got {shown}")

    time = _optional(cloudevent, "time")
    if time is not None and not _is_rfc3339(time):
        raise InvalidEventData(f"CloudEvent attribute 'time' is not an RFC 3339 timestamp: {time[:80]!r}")

    version = None
    dataschema = _optional(cloudevent, "dataschema")
    contract = parse_dataschema(dataschema) if dataschema is not None else None
    if contract is not None:  # any other schema URI names no contract of this bus
        if contract[0] != event_type:
            raise InvalidEventData(
                f"CloudEvent dataschema {dataschema!r} names the contract of {contract[0]!r}, not of its "
                f"type {event_type!r}"
            )
        if contract[1] < 1:
            raise InvalidEventData(f"CloudEvent dataschema {dataschema!r}: a contract version is 1 or more")
        version = contract[1]

    causation_id = _optional(cloudevent, "causationid")
    correlation_id = _optional(cloudevent, "correlationid")
    traceparent = _optional(cloudevent, "traceparent")
    if traceparent is not None and not _TRACEPARENT_RE.match(traceparent):
        raise InvalidEventData(f"CloudEvent traceparent {traceparent[:80]!r} is not a W3C traceparent")
    return InboundEvent(
        event_type=event_type,
        data=dict(data),
        event_id=derive_event_id(source, cloudevent_id),
        user_id=_user_id(cloudevent),
        module=_module(source),
        version=version,
        causation_id=None if causation_id is None else derive_event_id(source, causation_id),
        correlation_id=None if correlation_id is None else derive_event_id(source, correlation_id),
        hops=_hops(cloudevent.get("hops")),
        time=time,
        traceparent=traceparent,
        tracestate=_optional(cloudevent, "tracestate"),
    )


def _required(cloudevent: Mapping[str, Any], name: str) -> str:
    value = cloudevent.get(name)
    if value is None:
        raise InvalidEventData(f"CloudEvent attribute {name!r} is required and missing")
    if not isinstance(value, str) or not value:
        raise InvalidEventData(f"CloudEvent attribute {name!r} must be a non-empty string, got {value!r:.80}")
    return value


def _optional(cloudevent: Mapping[str, Any], name: str) -> str | None:
    value = cloudevent.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidEventData(f"CloudEvent attribute {name!r} must be a non-empty string, got {value!r:.80}")
    return value


def _user_id(cloudevent: Mapping[str, Any]) -> str | int | None:
    subject = _optional(cloudevent, "subject")
    kind = cloudevent.get("useridtype")
    if kind is None:
        return None if subject is None else int(subject) if _INT_RE.fullmatch(subject) else subject
    if kind == "str":
        return subject or ""
    if kind == "int" and subject is not None and _INT_RE.fullmatch(subject):
        return int(subject)
    raise InvalidEventData(
        f"CloudEvent useridtype {kind!r} with subject {subject!r}: useridtype is 'str', "
        "or 'int' with an integer subject"
    )


def _hops(value: object) -> int | None:
    if value is None:
        return None
    # A JSON number in structured mode, a string where a transport made every attribute one.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InvalidEventData(f"CloudEvent attribute 'hops' must be an integer >= 0, got {value!r:.80}")


def _module(source: str) -> str | None:
    if source == _NO_MODULE:
        return None
    module = unquote(source[len(_MODULE_PREFIX) :]) if source.startswith(_MODULE_PREFIX) else source
    if len(module) > _MAX_MODULE_CHARS:
        raise InvalidEventData(
            f"CloudEvent source is {len(module)} characters; the module it names holds at most {_MAX_MODULE_CHARS}"
        )
    return module


def _is_rfc3339(value: str) -> bool:
    if not _RFC3339_RE.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper())  # Python 3.11 refuses a lower-case 't' or 'z'
    except ValueError:  # a 13th month, a 25th hour
        return False
    return True


def _timestamp(time: str) -> str:
    try:
        datetime.fromisoformat(time)
    except ValueError:
        return time.upper()
    return time


# -- writing ----------------------------------------------------------------------------


def _source(module: str | None) -> str:
    if module is None:
        return _NO_MODULE
    if _ABSOLUTE_URI_RE.fullmatch(module) and not module.lower().startswith(_NO_MODULE):
        return module
    return _MODULE_PREFIX + quote(module, safe="")


def _rfc3339(timestamp: str) -> str:
    if _is_rfc3339(timestamp):
        return timestamp
    moment = datetime.fromisoformat(timestamp)  # Envelope checked that it parses
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def _reasons(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5])


# -- publishing -------------------------------------------------------------------------


def _model_instance(bus: EventBus, event_type: str, version: int, data: dict[str, Any]) -> BaseModel:
    paths = bus.settings.event_contract_modules
    load_contract_modules(paths, required=False)
    contract = contracts.get(event_type, version, within=paths)
    if contract is None:
        declared = ", ".join(str(v) for v in contracts.versions(event_type)) or "none"
        raise InvalidEventData(
            f"CloudEvent dataschema {dataschema_uri(event_type, version)!r} names version {version} of "
            f"{event_type!r}, which this process does not declare (declared: {declared}; "
            "EVENT_CONTRACT_MODULES lists the contracts packages)"
        )
    try:
        return contract.model.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '<data>'!r}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidEventData(
            f"data of {event_type!r} does not match its contract {contract.name} (version {version}): {fields}",
            errors=exc.errors(include_url=False),
        ) from None


@contextmanager
def _continuing(event: InboundEvent) -> Iterator[None]:
    with ExitStack() as stack:
        if event.causation_id is not None:
            # publish makes causation = the cause, correlation = its correlation, hops = its
            # hops + 1. from_cloudevent filled in both (hops >= 1 here); the fallbacks are its.
            cause = {
                "event_id": event.causation_id,
                "correlation_id": event.correlation_id or event.causation_id,
                "hops": (event.hops or 1) - 1,
            }
            stack.enter_context(handling(cause, module=None))
        if event.traceparent is not None:
            carrier = {"traceparent": event.traceparent}
            if event.tracestate is not None:
                carrier["tracestate"] = event.tracestate
            token = otel_context.attach(_PROPAGATOR.extract(carrier))
            stack.callback(otel_context.detach, token)
        yield
