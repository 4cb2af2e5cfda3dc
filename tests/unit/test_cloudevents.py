"""The CloudEvents 1.0 mapping, checked against the official ``cloudevents`` SDK both ways.

Ours -> SDK: what :func:`to_cloudevent` writes is read by the SDK's JSON format (its v2 core,
which validates every attribute when it builds an event) and by its v1 compatibility API,
with the right attributes and data, also after the SDK carried it in HTTP binary mode.
SDK -> ours: events the SDK builds and serialises are read by :func:`from_cloudevent` into
the right publish arguments. Round trips keep the envelope exactly, user id type included.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings.http import from_http_event, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import conversion as v1_conversion
from cloudevents.v1 import http as v1_http
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from pydantic import BaseModel, Field

from project.bus import EventBus
from project.cloudevents import (
    derive_event_id,
    envelope_from_cloudevent,
    from_cloudevent,
    publish_cloudevent,
    to_cloudevent,
)
from project.context import Outbox, collecting
from project.contracts import contracts
from project.errors import HopLimitExceeded, InvalidEventData
from project.settings import Settings

EVENT_ID = "0b7d4c1e-2f3a-4b5c-8d6e-7f8091a2b3c4"
CAUSE_ID = "1c8e5d2f-3a4b-4c6d-9e7f-8091a2b3c4d5"
ROOT_ID = "2d9f6e3a-4b5c-4d7e-8f80-91a2b3c4d5e6"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _envelope(**changes: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_type": "cosmic.solar_storm.detected",
        "user_id": 42,
        "data": {"kp_index": 8, "severity": "G4", "nested": {"list": [1, 2.5, None, "ü"]}},
        "timestamp": "2024-05-10T17:04:11.123456+00:00",
        "module": "solar",
        "causation_id": CAUSE_ID,
        "correlation_id": ROOT_ID,
        "hops": 2,
    }
    envelope.update(changes)
    return envelope


def _wire(obj: dict[str, Any]) -> dict[str, Any]:
    """As it would arrive: through JSON text."""
    parsed: dict[str, Any] = json.loads(json.dumps(obj))
    return parsed


# -- ours -> the SDK --------------------------------------------------------------------


def test_a_cloudevent_we_write_is_read_by_the_sdk_with_every_attribute() -> None:
    envelope = _envelope(version=3, traceparent=TRACEPARENT, tracestate="vendor=1")
    event = JSONFormat().read(None, json.dumps(to_cloudevent(envelope)))
    assert isinstance(event, CloudEvent)  # the v1.0 class: validated on construction
    assert event.get_specversion() == "1.0"
    assert event.get_id() == EVENT_ID
    assert event.get_type() == "cosmic.solar_storm.detected"
    assert event.get_source() == "urn:eventbus:module:solar"
    assert event.get_subject() == "42"
    assert event.get_time() == datetime(2024, 5, 10, 17, 4, 11, 123456, tzinfo=UTC)
    assert event.get_datacontenttype() == "application/json"
    assert event.get_dataschema() == "urn:eventbus:contract:cosmic.solar_storm.detected:v3"
    assert event.get_extension("correlationid") == ROOT_ID
    assert event.get_extension("causationid") == CAUSE_ID
    assert event.get_extension("hops") == 2
    assert event.get_extension("traceparent") == TRACEPARENT
    assert event.get_extension("tracestate") == "vendor=1"
    assert event.get_data() == envelope["data"]


def test_a_cloudevent_we_write_is_read_by_the_sdk_v1_api() -> None:
    cloudevent = to_cloudevent(_envelope())
    for event in (v1_http.from_dict(cloudevent), v1_http.from_json(json.dumps(cloudevent))):
        assert (event["specversion"], event["id"], event["type"], event["source"], event["subject"]) == (
            "1.0",
            EVENT_ID,
            "cosmic.solar_storm.detected",
            "urn:eventbus:module:solar",
            "42",
        )
        assert (event["correlationid"], event["causationid"], event["hops"]) == (ROOT_ID, CAUSE_ID, 2)
        assert event.get_data() == _envelope()["data"]
        # ...and what the v1 API writes again is the same envelope.
        assert envelope_from_cloudevent(json.loads(v1_conversion.to_json(event))) == _envelope()


def test_what_the_sdk_writes_back_is_the_same_envelope() -> None:
    envelope = _envelope(version=1, traceparent=TRACEPARENT)
    written = json.loads(JSONFormat().write(JSONFormat().read(None, json.dumps(to_cloudevent(envelope)))))
    back = envelope_from_cloudevent(written)
    # The SDK writes a UTC time with 'Z' for '+00:00': the same instant.
    assert datetime.fromisoformat(back.pop("timestamp")) == datetime.fromisoformat(envelope.pop("timestamp"))
    assert back == envelope


def test_an_event_carried_in_http_binary_mode_by_the_sdk_reads_the_same() -> None:
    envelope = _envelope(user_id="42", version=2)
    message = to_binary_event(JSONFormat().read(None, json.dumps(to_cloudevent(envelope))))
    assert message.headers["ce-hops"] == "2"  # every attribute is a string in a header
    structured = json.loads(to_structured_event(from_http_event(message)).body)
    back = envelope_from_cloudevent(structured)
    assert datetime.fromisoformat(back.pop("timestamp")) == datetime.fromisoformat(envelope.pop("timestamp"))
    assert back == envelope
    assert type(back["user_id"]) is str


# -- the SDK -> ours --------------------------------------------------------------------


def test_an_sdk_event_from_outside_gives_the_publish_arguments() -> None:
    event = CloudEvent(
        {
            "type": "shop.order.placed",
            "source": "https://shop.example/orders",
            "id": "order-1234",
            "subject": "42",
            "dataschema": "https://shop.example/schemas/order.json",  # names no contract of ours
            "correlationid": "session-9",
            "causationid": "cart-77",
            "hops": 1,
        },
        {"order_id": 1234, "total": 99.5},
    )
    inbound = from_cloudevent(json.loads(JSONFormat().write(event)))
    # Pinned: a derived event_id must not change between releases, or a CloudEvent published
    # again after an upgrade would be stored twice.
    name = json.dumps(["https://shop.example/orders", "order-1234"])
    expected_id = str(uuid.uuid5(uuid.UUID("a2fcfd63-2a4f-4935-aefa-71fa6091b5b5"), name))
    assert inbound.event_id == expected_id == derive_event_id("https://shop.example/orders", "order-1234")
    assert inbound.event_type == "shop.order.placed"
    assert inbound.data == {"order_id": 1234, "total": 99.5}
    assert inbound.user_id == 42
    assert inbound.module == "https://shop.example/orders"
    assert inbound.version is None
    assert inbound.causation_id == derive_event_id("https://shop.example/orders", "cart-77")
    assert inbound.correlation_id == derive_event_id("https://shop.example/orders", "session-9")
    assert inbound.hops == 1
    # The same CloudEvent read again is the same event: publish stores it once.
    assert from_cloudevent(json.loads(JSONFormat().write(event))).event_id == expected_id


def test_only_a_canonical_uuid_id_is_kept_as_the_event_id() -> None:
    assert derive_event_id("/s", EVENT_ID) == EVENT_ID
    for other in (EVENT_ID.upper(), EVENT_ID + "\n", EVENT_ID.replace("-", ""), f"{{{EVENT_ID}}}"):
        derived = derive_event_id("/s", other)
        assert derived not in (EVENT_ID, other)
        assert derived == derive_event_id("/s", other) != derive_event_id("/t", other)


def test_an_sdk_event_with_only_its_defaults_is_a_root_event() -> None:
    event = CloudEvent({"type": "cosmic.full_moon", "source": "urn:eventbus"}, {"phase": 1.0})
    inbound = from_cloudevent(json.loads(JSONFormat().write(event)))
    assert inbound.event_id == event.get_id()  # the SDK makes a UUID 4: kept as it is
    assert (inbound.user_id, inbound.module, inbound.version) == (None, None, None)
    assert (inbound.causation_id, inbound.correlation_id, inbound.hops) == (None, inbound.event_id, 0)


def test_an_event_made_with_the_sdk_v1_api_gives_the_publish_arguments() -> None:
    attributes = {
        "type": "user.birth_data.updated",
        "source": "urn:eventbus:module:solar",
        "id": EVENT_ID,
        "subject": "u9",
        "dataschema": "urn:eventbus:contract:user.birth_data.updated:v2",
        "datacontenttype": "application/json; charset=utf-8",
    }
    event = v1_http.CloudEvent(attributes, {"user_id": "u9"})
    _headers, body = v1_conversion.to_structured(event)
    for text in (body, v1_conversion.to_json(event)):
        inbound = from_cloudevent(json.loads(text))
        assert (inbound.event_id, inbound.event_type, inbound.user_id, inbound.module, inbound.version) == (
            EVENT_ID,
            "user.birth_data.updated",
            "u9",
            "solar",
            2,
        )
        assert inbound.data == {"user_id": "u9"}


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="int-user"),
        pytest.param({"user_id": "u9"}, id="str-user"),
        pytest.param({"user_id": "42"}, id="str-user-that-reads-as-an-int"),
        pytest.param({"user_id": -7}, id="negative-int-user"),
        pytest.param({"user_id": "007"}, id="str-user-with-leading-zeros"),
        pytest.param({"user_id": "42\n"}, id="str-user-with-a-trailing-newline"),
        pytest.param({"user_id": ""}, id="empty-str-user"),
        pytest.param({"user_id": None, "module": None}, id="no-user-no-module"),
        pytest.param({"module": "https://shop.example/orders"}, id="module-that-is-a-uri"),
        pytest.param({"module": "urn:eventbus:module:x"}, id="module-that-looks-like-ours"),
        pytest.param({"module": "my module/ü"}, id="module-that-needs-encoding"),
        pytest.param({"module": ""}, id="empty-module"),
        pytest.param({"version": 1}, id="with-version"),
        pytest.param({"traceparent": TRACEPARENT, "tracestate": "a=1,b=2"}, id="with-trace-context"),
        pytest.param({"causation_id": None, "correlation_id": EVENT_ID, "hops": 0}, id="root"),
        pytest.param({"causation_id": None, "correlation_id": None, "hops": 0}, id="before-correlation"),
    ],
)
def test_an_envelope_comes_back_exactly(changes: dict[str, Any]) -> None:
    envelope = _envelope(**changes)
    cloudevent = _wire(to_cloudevent(envelope))
    back = envelope_from_cloudevent(cloudevent)
    assert back == envelope
    assert type(back["user_id"]) is type(envelope["user_id"])
    assert to_cloudevent(back) == cloudevent
    JSONFormat().read(None, json.dumps(cloudevent))  # and the SDK accepts it


def test_a_timestamp_that_is_not_rfc_3339_is_written_in_utc() -> None:
    cloudevent = to_cloudevent(_envelope(timestamp="2024-05-10 17:04:11"))
    assert cloudevent["time"] == "2024-05-10T17:04:11+00:00"
    assert to_cloudevent(_envelope(timestamp="2024-05-10T19:04:11+02:00"))["time"] == "2024-05-10T19:04:11+02:00"


_NAMES = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), min_size=2, max_size=4).map(".".join)
_IDS = st.uuids().map(str)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_TIMES = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat())
_MODULES = st.none() | st.text(max_size=200) | st.sampled_from(["solar", "https://shop.example/a?b=c", "urn:eventbus"])
_USERS = st.none() | st.integers() | st.text(max_size=200) | st.integers().map(str)


@st.composite
def _envelopes(draw: st.DrawFn) -> dict[str, Any]:
    event_id = draw(_IDS)
    chain = draw(st.sampled_from(["root", "child", "legacy"]))
    envelope: dict[str, Any] = {
        "event_id": event_id,
        "event_type": draw(_NAMES),
        "user_id": draw(_USERS),
        "data": draw(st.dictionaries(st.text(max_size=8), _JSON, max_size=5)),
        "timestamp": draw(_TIMES),
        "module": draw(_MODULES),
        "causation_id": draw(_IDS) if chain == "child" else None,
        "correlation_id": {"root": event_id, "child": draw(_IDS), "legacy": None}[chain],
        "hops": draw(st.integers(1, 16)) if chain == "child" else 0,
    }
    if draw(st.booleans()):
        envelope["version"] = draw(st.integers(1, 50))
    if draw(st.booleans()):
        envelope["traceparent"] = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        if draw(st.booleans()):
            envelope["tracestate"] = draw(st.from_regex(r"[a-z]{1,8}=[a-z0-9]{1,8}", fullmatch=True))
    return envelope


@settings(max_examples=300, deadline=None)
@given(_envelopes())
def test_every_envelope_comes_back_exactly_and_the_sdk_accepts_its_cloudevent(envelope: dict[str, Any]) -> None:
    cloudevent = _wire(to_cloudevent(envelope))
    assert all(len(name) <= 20 and name.isalnum() and name.islower() for name in cloudevent if name != "data")
    back = envelope_from_cloudevent(cloudevent)
    assert back == envelope
    assert type(back["user_id"]) is type(envelope["user_id"])
    assert to_cloudevent(back) == cloudevent
    event = JSONFormat().read(None, json.dumps(cloudevent))
    assert (event.get_id(), event.get_type(), event.get_data()) == (
        envelope["event_id"],
        envelope["event_type"],
        envelope["data"],
    )


# -- publishing -------------------------------------------------------------------------


class _Reading(BaseModel):
    celsius: float = Field(ge=-90, le=60)


class _ReadingV2(BaseModel):
    kelvin: float = Field(ge=180, le=335)


contracts.declare("cetest.reading.taken", _Reading, version=1)
contracts.declare("cetest.reading.taken", _ReadingV2, version=2)


def _publish(cloudevent: dict[str, Any], **settings: Any) -> dict[str, Any]:
    bus = EventBus(Settings(event_contract_modules=[__name__], **settings))
    outbox: Outbox = []
    with collecting(outbox):  # publish keeps the event here instead of sending it
        event_id = publish_cloudevent(bus, cloudevent)
    [(_event_type, sent_id, encoded)] = outbox
    assert sent_id == event_id
    envelope: dict[str, Any] = json.loads(encoded)
    return envelope


def _outside(**changes: Any) -> dict[str, Any]:
    cloudevent: dict[str, Any] = {
        "specversion": "1.0",
        "id": "reading-17",
        "source": "https://sensors.example/station/4",
        "type": "sensor.reading.taken",
        "subject": "42",
        "time": "2024-05-10T17:04:11Z",
        "data": {"celsius": 21.5},
    }
    cloudevent.update(changes)
    return {k: v for k, v in cloudevent.items() if v is not None}


def test_publishing_a_root_cloudevent_makes_a_root_envelope() -> None:
    envelope = _publish(_outside())
    event_id = derive_event_id("https://sensors.example/station/4", "reading-17")
    assert envelope["event_id"] == event_id
    assert (envelope["event_type"], envelope["user_id"], envelope["data"]) == (
        "sensor.reading.taken",
        42,
        {"celsius": 21.5},
    )
    assert envelope["module"] == "https://sensors.example/station/4"
    assert (envelope["causation_id"], envelope["correlation_id"], envelope["hops"]) == (None, event_id, 0)
    assert "version" not in envelope
    assert _publish(_outside())["event_id"] == event_id  # the same CloudEvent, the same event


def test_publishing_a_cloudevent_continues_the_chain_it_names() -> None:
    envelope = _publish(_outside(id=EVENT_ID, causationid=CAUSE_ID, correlationid=ROOT_ID, hops=2))
    assert (envelope["event_id"], envelope["causation_id"], envelope["correlation_id"], envelope["hops"]) == (
        EVENT_ID,
        CAUSE_ID,
        ROOT_ID,
        2,
    )
    # Without hops and correlationid, the cause is taken for the root of the chain.
    envelope = _publish(_outside(causationid="reading-16"))
    cause = derive_event_id("https://sensors.example/station/4", "reading-16")
    assert (envelope["causation_id"], envelope["correlation_id"], envelope["hops"]) == (cause, cause, 1)


def test_an_envelope_we_made_is_published_again_as_the_same_envelope() -> None:
    envelope = _envelope(event_type="sensor.reading.taken", user_id="42")
    published = _publish(to_cloudevent(envelope), events_max_hops=5)
    assert published.pop("timestamp") != envelope.pop("timestamp")  # stamped when stored
    assert published == envelope


def test_publishing_a_cloudevent_past_the_hop_limit_is_refused() -> None:
    with pytest.raises(HopLimitExceeded, match="hop 4"):
        _publish(_outside(causationid=CAUSE_ID, hops=4), events_max_hops=3)


def test_publishing_a_cloudevent_continues_its_trace() -> None:
    assert not trace.get_current_span().get_span_context().is_valid
    envelope = _publish(_outside(traceparent=TRACEPARENT, tracestate="vendor=1"))
    # The same trace (the span is the publish's own if a tracer provider records spans).
    assert envelope["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    assert envelope["tracestate"] == "vendor=1"
    assert not trace.get_current_span().get_span_context().is_valid  # detached afterwards


def test_a_dataschema_validates_the_data_against_that_contract_version() -> None:
    schema = "urn:eventbus:contract:cetest.reading.taken:v{}"
    envelope = _publish(_outside(type="cetest.reading.taken", dataschema=schema.format(1)))
    assert (envelope["version"], envelope["data"]) == (1, {"celsius": 21.5})
    envelope = _publish(_outside(type="cetest.reading.taken", dataschema=schema.format(2), data={"kelvin": 294.65}))
    assert (envelope["version"], envelope["data"]) == (2, {"kelvin": 294.65})
    # No dataschema: the latest version, as for any publish of a dict.
    assert _publish(_outside(type="cetest.reading.taken", data={"kelvin": 300}))["version"] == 2
    with pytest.raises(InvalidEventData, match=r"version 1\): field 'celsius'") as caught:
        _publish(_outside(type="cetest.reading.taken", dataschema=schema.format(1), data={"celsius": 99}))
    assert caught.value.errors[0]["loc"] == ("celsius",)
    with pytest.raises(InvalidEventData, match=r"names version 7 .* does not declare \(declared: 1, 2"):
        _publish(_outside(type="cetest.reading.taken", dataschema=schema.format(7)))


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cloudevent", "message"),
    [
        (_outside(specversion="0.3"), r"specversion '0.3' is not supported: only CloudEvents 1.0"),
        ({k: v for k, v in _outside().items() if k != "specversion"}, r"'specversion' is missing"),
        ({k: v for k, v in _outside().items() if k != "id"}, r"attribute 'id' is required and missing"),
        (_outside(source=""), r"attribute 'source' must be a non-empty string"),
        (_outside(type=7), r"attribute 'type' must be a non-empty string, got 7"),
        (_outside(type="com.Example.Thing"), r"attribute 'type': invalid event name"),
        (_outside(data=[1, 2]), r"data must be a JSON object, got list"),
        (_outside(data="21.5"), r"data must be a JSON object, got str"),
        ({**_outside(), "data": None}, r"data must be a JSON object, got null"),
        (_outside(datacontenttype="text/plain"), r"datacontenttype 'text/plain' is not JSON"),
        (_outside(datacontenttype="application/xml"), r"datacontenttype 'application/xml' is not JSON"),
        ({**_outside(data=None), "data_base64": "e30="}, r"binary data \(data_base64\)"),
        (_outside(time="yesterday"), r"'time' is not an RFC 3339 timestamp"),
        (_outside(time="2024-13-01T00:00:00Z"), r"'time' is not an RFC 3339 timestamp"),
        (_outside(hops=-1), r"'hops' must be an integer >= 0, got -1"),
        (_outside(hops="two"), r"'hops' must be an integer >= 0, got 'two'"),
        (_outside(hops=2), r"hops 2 without causationid"),
        (_outside(correlationid=ROOT_ID), r"correlationid without causationid must be the event's own id"),
        (_outside(causationid=CAUSE_ID, hops=0), r"hops 0 with causationid"),
        (_outside(useridtype="int", subject="u9"), r"useridtype 'int' with subject 'u9'"),
        (_outside(dataschema="urn:eventbus:contract:other.thing:v1"), r"names the contract of 'other.thing'"),
        (_outside(traceparent="not-a-trace"), r"traceparent 'not-a-trace' is not a W3C traceparent"),
        (_outside(source="x" * 201), r"source is 201 characters"),
        ({**_outside(), "Bad-Name": 1}, r"attribute name 'Bad-Name' is not valid"),
        ([_outside()], r"a structured-mode CloudEvent is a JSON object, got list \(a batch\?"),
    ],
)
def test_a_bad_cloudevent_is_refused_with_a_clear_message(cloudevent: Any, message: str) -> None:
    with pytest.raises(InvalidEventData, match=message):
        from_cloudevent(cloudevent)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "text/json", "application/ld+json"]
)
def test_any_json_datacontenttype_is_accepted(content_type: str) -> None:
    assert from_cloudevent(_outside(datacontenttype=content_type)).data == {"celsius": 21.5}


def test_hops_as_a_string_and_null_optional_attributes_are_read() -> None:
    inbound = from_cloudevent({**_outside(causationid=CAUSE_ID, hops="3"), "subject": None, "dataschema": None})
    assert (inbound.hops, inbound.user_id, inbound.version) == (3, None, None)


def test_rebuilding_an_envelope_needs_a_time_and_a_valid_envelope() -> None:
    with pytest.raises(InvalidEventData, match="'time' is missing"):
        envelope_from_cloudevent(_outside(time=None))
    with pytest.raises(InvalidEventData, match="not a valid envelope: user_id"):
        envelope_from_cloudevent(_outside(subject="u" * 201))


def test_to_cloudevent_refuses_what_is_not_an_envelope() -> None:
    with pytest.raises(InvalidEventData, match="not a valid envelope: event_id"):
        to_cloudevent(_envelope(event_id="not-a-uuid"))
    with pytest.raises(InvalidEventData, match="an envelope is a JSON object, got list"):
        to_cloudevent([])  # type: ignore[arg-type]
