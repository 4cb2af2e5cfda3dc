"""Trace context in the envelope, and when the SDK is set up: no SDK provider in this process."""

from __future__ import annotations

import json
from contextvars import Token

import pytest
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from project.envelope import decode_envelope, encode_envelope
from project.errors import MalformedEnvelope
from project.messages import build_task_message
from project.observability import otel_sdk, tracing
from project.settings import Settings

TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


def _encode() -> dict[str, object]:
    _, encoded = encode_envelope("user.created", {}, user_id=1, module="m", max_bytes=65536, max_hops=16)
    envelope: dict[str, object] = json.loads(encoded)
    return envelope


def test_an_envelope_published_outside_a_span_has_no_trace_fields() -> None:
    assert not tracing.active()
    envelope = _encode()
    assert "traceparent" not in envelope
    assert "tracestate" not in envelope


def test_an_envelope_published_inside_a_span_carries_its_w3c_context() -> None:
    parent = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        envelope = _encode()
    finally:
        context.detach(token)
    assert envelope["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    assert decode_envelope(json.dumps(envelope), 65536).traceparent == envelope["traceparent"]


def test_the_router_accepts_envelopes_with_and_without_trace_fields_and_refuses_a_bad_one() -> None:
    envelope = _encode()
    assert decode_envelope(json.dumps(envelope), 65536).traceparent is None
    traced = {**envelope, "traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01", "tracestate": "vendor=1"}
    assert decode_envelope(json.dumps(traced), 65536).tracestate == "vendor=1"
    with pytest.raises(MalformedEnvelope, match="traceparent"):
        decode_envelope(json.dumps({**envelope, "traceparent": "not-a-trace"}), 65536)


def _current(trace_id: int, span_id: int) -> Token[Context]:
    parent = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))


def _published() -> dict[str, str]:
    return {"event_type": "user.created", "traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"}


def test_a_handler_span_without_a_current_span_is_a_child_of_the_publishing_span() -> None:
    parent, links = tracing._parent(_published())
    assert parent is not None
    assert trace.get_current_span(parent).get_span_context().span_id == SPAN_ID
    assert links == []


def test_a_handler_span_nests_in_celerys_span_of_the_same_trace() -> None:
    # Celery's instrumentation continued the publisher's trace from the task headers.
    token = _current(TRACE_ID, 0x1111)
    try:
        assert tracing._parent(_published()) == (None, [])
    finally:
        context.detach(token)


def test_a_handler_span_nests_in_celerys_span_of_another_trace_and_links_the_publisher() -> None:
    # use_span_links=True: Celery's span began its own trace.
    token = _current(0x2222, 0x1111)
    try:
        parent, links = tracing._parent(_published())
    finally:
        context.detach(token)
    assert parent is None
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [(TRACE_ID, SPAN_ID)]


def test_an_event_published_inside_a_span_sends_its_context_in_the_task_headers() -> None:
    fields = {"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01", "tracestate": "vendor=1"}
    args = {"task_name": "t", "task_id": "i", "queue": "q", "envelope_json": "{}", "event_type": "e", "event_id": "i"}
    headers = json.loads(build_task_message(**args, **fields))["headers"]
    assert {k: headers[k] for k in fields} == fields
    assert list(headers)[-2:] == ["traceparent", "tracestate"]
    extracted = TraceContextTextMapPropagator().extract(headers)
    assert trace.get_current_span(extracted).get_span_context().trace_id == TRACE_ID
    untraced = json.loads(build_task_message(**args))["headers"]
    assert "traceparent" not in untraced
    assert "tracestate" not in untraced
    assert list(json.loads(build_task_message(**args, traceparent=fields["traceparent"]))["headers"])[-1] == (
        "traceparent"
    )


def test_spans_are_made_only_with_a_real_tracer_provider() -> None:
    assert not tracing.active()  # so publish starts no span (tracing.start_send)
    with tracing.handler_span({"event_type": "user.created"}, "h", "q") as span:
        assert span is None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),
        ({"otel_traces_exporter": "none"}, []),
        ({"otel_traces_exporter": "console,otlp"}, ["console", "otlp"]),
        ({"otel_exporter_otlp_endpoint": "http://collector:4318"}, ["otlp"]),
        # Empty is unset (docker-compose.yml passes both through, empty by default).
        ({"otel_traces_exporter": "", "otel_exporter_otlp_endpoint": "http://collector:4318"}, ["otlp"]),
        ({"otel_traces_exporter": "", "otel_exporter_otlp_endpoint": ""}, []),
        ({"otel_exporter_otlp_traces_endpoint": "http://c:4318/v1/traces", "otel_sdk_disabled": True}, []),
    ],
)
def test_otel_variables_decide_what_is_exported(env: dict[str, object], names: list[str]) -> None:
    assert otel_sdk.exporter_names(Settings(**env)) == names  # type: ignore[arg-type]


def test_without_otel_variables_no_sdk_is_installed() -> None:
    assert otel_sdk.configure(Settings(), service_name="test") is False
    assert not tracing.active()
