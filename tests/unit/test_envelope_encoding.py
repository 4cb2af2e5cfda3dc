"""The cheap encoding of publish (orjson, no model) agrees with the checked one (the model, the
standard encoder) on everything: what it accepts decodes on the router to the same event,
and what it cannot prove valid goes through the model, which refuses it as before."""

from __future__ import annotations

import enum
import json
import math
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from project import envelope as env_module
from project.context import handling
from project.envelope import decode_envelope, encode_envelope, new_event_id, now_iso
from project.errors import (
    EventBusError,
    InvalidEventData,
    MalformedEnvelope,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from project.observability import metrics, tracing

MAX = 64 * 1024


def _encode(data: Any, **kw: Any) -> tuple[str, str]:
    kw.setdefault("user_id", None)
    kw.setdefault("module", None)
    return encode_envelope("user.note.added", data, max_bytes=kw.pop("max_bytes", MAX), max_hops=16, **kw)


def _checked(data: Any, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[str, str]:
    """The same call with the cheap path switched off: the model and the standard encoder only."""
    with monkeypatch.context() as m:
        m.setattr(env_module, "_encode_plain", lambda envelope, max_bytes: None)
        return _encode(data, **kw)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        _, raw = call()
    except EventBusError as exc:
        return type(exc).__name__, None
    envelope = json.loads(raw)
    return "ok", {k: v for k, v in envelope.items() if k not in ("event_id", "correlation_id", "timestamp")}


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["a\x00b", "lone \ud800", "\udfff", "😀", "back\\u0000slash", "null", "NaN", "Infinity"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["k\x00", "\ud800"]), inner, max_size=3)
        | st.dictionaries(st.integers(0, 3), inner, max_size=2)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=8), _values, max_size=4),
    user_id=st.none()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.sampled_from(["\udfff", "a\x00", "u" * 200, "u" * 201, True]),
    module=st.none() | st.text(max_size=8) | st.sampled_from(["m\x00", "\ud800", "m" * 200, "m" * 201]),
)
def test_the_cheap_path_accepts_and_refuses_exactly_what_the_model_does(
    data: dict[str, Any], user_id: Any, module: Any
) -> None:
    kw = {"user_id": user_id, "module": module}
    plain = _outcome(lambda: _encode(data, **kw))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(env_module, "_encode_plain", lambda envelope, max_bytes: None)
        checked = _outcome(lambda: _encode(data, **kw))
    assert plain[0] == checked[0]
    if plain[0] == "ok":
        # NaN never gets this far; -0.0 == 0.0 and big floats round-trip the same either way.
        assert plain[1] == checked[1]


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.text(max_size=8), _values, max_size=4))
def test_whatever_publish_accepts_the_router_decodes(data: dict[str, Any]) -> None:
    try:
        _, raw = _encode(data)
    except EventBusError:
        return
    decoded = decode_envelope(raw.encode(), MAX)
    assert decoded.data == json.loads(raw)["data"]


def test_the_common_event_takes_the_cheap_path_and_is_utf8_json(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = env_module._encode_checked
    monkeypatch.setattr(env_module, "_encode_checked", lambda *a: calls.append(a) or real(*a))
    event_id, raw = _encode({"kp_index": 8, "severity": "G4", "text": "ü ẞ 😀", "when": None}, user_id=42)
    assert calls == []
    assert "ü ẞ 😀" in raw  # written as UTF-8, not escaped
    envelope = json.loads(raw)
    assert envelope["event_id"] == event_id and envelope["user_id"] == 42
    assert list(envelope) == [
        "event_id", "event_type", "user_id", "data", "timestamp", "module", "causation_id", "correlation_id", "hops",
    ]  # fmt: skip
    assert decode_envelope(raw, MAX).data["text"] == "ü ẞ 😀"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"nan": float("nan")}, PayloadNotSerializable),  # orjson would write null
        ({"deep": [{"x": -math.inf}]}, PayloadNotSerializable),
        ({"when": datetime.now(UTC)}, PayloadNotSerializable),
        ({"s": {1, 2}}, PayloadNotSerializable),
        ({"text": "nul \x00"}, InvalidEventData),
        ({"s": "lone \ud800"}, InvalidEventData),
        ({1: "a key that is no string"}, InvalidEventData),
        ({"blob": "ü" * 40_000}, PayloadTooLarge),  # 80 kB of UTF-8
    ],
)
def test_what_the_cheap_path_cannot_write_is_refused_as_before(data: dict[Any, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        _encode(data)


def test_the_size_limit_counts_the_bytes_sent() -> None:
    _encode({"blob": "ü" * 20_000})  # 40 kB sent (each would be 6 bytes as an ASCII escape)
    with pytest.raises(PayloadTooLarge):
        _encode({"blob": "x" * 70_000})


@pytest.mark.parametrize("path", ["cheap", "checked"])
def test_the_size_limit_counts_the_same_bytes_on_either_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    encode = _encode if path == "cheap" else lambda data, **kw: _checked(data, monkeypatch, **kw)
    limit = 64 * 1024
    _, raw = encode({"blob": "ü" * 20_000}, max_bytes=limit)  # 40 kB of UTF-8; 120 kB of ASCII escapes
    assert len(raw.encode()) <= limit
    assert decode_envelope(raw.encode(), limit).data["blob"] == "ü" * 20_000
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        encode({"blob": "ü" * 33_000}, max_bytes=limit)


def _nested(depth: int, kind: str) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("path", ["cheap", "checked"])
def test_data_nested_deeper_than_the_router_reads_is_refused_at_publish(
    kind: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = _encode if path == "cheap" else lambda data, **kw: _checked(data, monkeypatch, **kw)
    # The envelope is the first level, data the second: data["d"] may nest 198 more.
    _, raw = encode({"d": _nested(env_module.MAX_DEPTH - 2, kind)})
    assert decode_envelope(raw, MAX).data["d"] == _nested(env_module.MAX_DEPTH - 2, kind)
    for depth in (env_module.MAX_DEPTH - 1, 260, 5_000):  # past the parser; past orjson; past Python's recursion
        with pytest.raises(InvalidEventData, match="nested too deep"):
            encode({"d": _nested(depth, kind)})
    # Past the limit is what the router refuses, so the limit is the router's.
    too_deep = json.dumps({**json.loads(raw), "data": {"d": _nested(env_module.MAX_DEPTH - 1, kind)}})
    with pytest.raises(MalformedEnvelope, match="recursion limit"):
        decode_envelope(too_deep, MAX)


def test_wide_data_with_many_brackets_is_not_mistaken_for_deep_data() -> None:
    _, raw = _encode({"rows": [{"n": [i]} for i in range(500)]})
    assert len(decode_envelope(raw, MAX).data["rows"]) == 500


def test_what_only_the_standard_encoder_writes_still_goes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Integers over 64 bits and keys that are not strings inside the data: orjson refuses them.
    _, raw = _encode({"big": 2**70, "nested": {1: "one"}}, user_id=2**70)
    assert json.loads(raw)["data"] == {"big": 2**70, "nested": {"1": "one"}}
    decode_envelope(raw, MAX)


class Colour(enum.Enum):
    RED = "red"


def test_uuids_and_enum_members_are_written_as_their_string_and_value_by_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    some = uuid.uuid4()
    data = {"id": some, "colour": Colour.RED}
    assert json.loads(_encode(data)[1])["data"] == {"id": str(some), "colour": "red"}
    assert json.loads(_checked(data, monkeypatch)[1])["data"] == {"id": str(some), "colour": "red"}


def test_chain_fields_from_a_handler_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    root = json.loads(_encode({})[1])
    with handling(root, "pinger"):
        child = json.loads(_encode({})[1])
    assert (child["causation_id"], child["hops"], child["module"]) == (root["event_id"], 1, "pinger")
    with handling({"event_id": "not-a-uuid", "hops": 0}, None), pytest.raises(InvalidEventData, match="causation_id"):
        _encode({})


def test_the_trace_context_is_what_the_w3c_propagator_writes() -> None:
    state = TraceState([("vendor", "1"), ("other", "x")])
    context = SpanContext(0xABC, 0x123, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=state)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, set_span_in_context(NonRecordingSpan(context)))
    assert tracing.trace_fields(context) == carrier
    envelope = json.loads(_encode({}, trace=tracing.trace_fields(context))[1])
    assert (envelope["traceparent"], envelope["tracestate"]) == (carrier["traceparent"], carrier["tracestate"])
    assert decode_envelope(json.dumps(envelope), MAX).tracestate == "vendor=1,other=x"
    with pytest.raises(InvalidEventData, match="tracestate"):  # over the model's 1024 characters
        _encode({}, trace={"traceparent": carrier["traceparent"], "tracestate": "v=" + "x" * 1100})


def test_event_ids_are_random_version_4_uuids_and_a_forked_child_makes_its_own() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for i in ids:
        parsed = uuid.UUID(i)
        assert str(parsed) == i and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be the parent's next one
        os.close(read)
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != new_event_id()


def test_timestamps_are_iso_8601_in_utc_with_microseconds() -> None:
    stamp = now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5
    assert len(stamp) == len("2026-11-28T12:00:00.000000+00:00")


def test_published_events_are_counted_per_event_type() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics.disable()
    metrics.enable(registry)
    try:
        for event_type in ("a.b", "a.b", "c.d"):
            metrics.record_published(event_type)
        get = registry.get_sample_value
        assert get("eventbus_events_published_total", {"event_type": "a.b"}) == 2
        assert get("eventbus_events_published_total", {"event_type": "c.d"}) == 1
    finally:
        metrics.disable()
