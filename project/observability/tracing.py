"""OpenTelemetry traces across the bus: publish → router → handler → the events it publishes.

``publish`` runs inside a PRODUCER span and writes the W3C trace context (``traceparent``,
``tracestate``) into the envelope; the router carries the envelope unchanged, and copies the
context into the headers of each task message (:mod:`project.messages`); the worker runs
the handler inside a CONSUMER span whose parent is that context, so what the handler
publishes continues the same trace. Attributes follow the OpenTelemetry messaging semantic
conventions: the event type is the destination, the event id the message id.

With Celery's own instrumentation (``opentelemetry-instrumentation-celery``) in the worker,
its ``run/<task>`` span continues the trace from those headers, and the handler's span nests
in it: publisher → ``run/<task>`` → handler, one trace.

Only the OpenTelemetry API is used here. Without an SDK tracer provider (none configured,
see :mod:`.otel_sdk`) every call returns after one check and envelopes carry no trace fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACE_FIELDS", "active", "handler_span", "publish_span", "trace_fields"]

#: The envelope fields that carry the trace context (both optional).
TRACE_FIELDS = ("traceparent", "tracestate")
MESSAGING_SYSTEM = "eventbus"

# W3C trace context only: the envelope has a field for each of its two headers, and nothing
# else (baggage, vendor formats) is carried through the bus.
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer("eventbus")


def active() -> bool:
    """True once an SDK (or any real) tracer provider is set in this process."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def trace_fields() -> dict[str, str]:
    """The current trace context as envelope fields, or ``{}`` outside a recorded span."""
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS}


@contextmanager
def publish_span(event_type: str) -> Iterator[Span | None]:
    """The PRODUCER span of one publish (None when tracing is off); the caller adds the id."""
    if not active():
        yield None
        return
    with _TRACER.start_as_current_span(
        f"send {event_type}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.destination.name": event_type,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        },
    ) as span:
        yield span


@contextmanager
def handler_span(
    event: Mapping[str, Any], handler: str, queue: str, ignore: tuple[type[BaseException], ...] = ()
) -> Iterator[Span | None]:
    """The CONSUMER span a handler runs in, a child of the span that published ``event``.

    When a span is already current (Celery's instrumentation runs the task in one), the
    handler's span is its child instead; a link points to the publishing span if that one
    is in another trace. An exception in ``ignore`` is control flow (a copy skipped), not an
    error of the span.
    """
    if not active():
        yield None
        return
    event_type = str(event.get("event_type"))
    attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": event_type,
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.message.id": str(event.get("event_id")),
        "messaging.destination.subscription.name": handler,
        "messaging.consumer.group.name": queue,
    }
    if event.get("correlation_id"):
        attributes["messaging.message.conversation_id"] = str(event["correlation_id"])
    parent, links = _parent(event)
    with _TRACER.start_as_current_span(
        f"process {event_type}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except ignore:
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
            raise


def _parent(event: Mapping[str, Any]) -> tuple[Context | None, list[Link]]:
    """The handler span's parent context (None: the current one) and its links."""
    carrier = {k: event[k] for k in TRACE_FIELDS if isinstance(event.get(k), str)}
    published = _PROPAGATOR.extract(carrier) if carrier else None
    current = trace.get_current_span().get_span_context()
    if not current.is_valid:
        return published, []
    # A span runs this task already: Celery's instrumentation, which continued the publisher's
    # trace from the task headers. Nest in it, or the trace would show the handler beside
    # the task run that contains it.
    origin = trace.get_current_span(published).get_span_context() if published is not None else None
    if origin is not None and origin.is_valid and origin.trace_id != current.trace_id:
        # The task's span began a trace of its own (instrumented with use_span_links=True,
        # or a message sent without the headers): keep the way back to the publisher.
        return None, [Link(origin)]
    return None, []
