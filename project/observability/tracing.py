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

import functools
import os
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from project.observability import send_span

__all__ = [
    "TRACE_FIELDS",
    "TraceFields",
    "active",
    "after_handling",
    "fail_send",
    "handler_span",
    "start_send",
    "trace_fields",
]

#: The envelope fields that carry the trace context (both optional).
TRACE_FIELDS = ("traceparent", "tracestate")
MESSAGING_SYSTEM = "eventbus"

# W3C trace context only: the envelope has a field for each of its two headers, and nothing
# else (baggage, vendor formats) is carried through the bus.
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer("eventbus")

# Once a real tracer provider is set it stays (OpenTelemetry sets it once per process): from
# then on, `active()` is one check of this global, and spans come from the provider's own
# tracer rather than through the proxy `_TRACER` forwards from.
_real_tracer: Tracer | None = None
# What makes publish spans for that tracer when it is the SDK's, cheaply (see .send_span).
_send_spans: send_span.SendSpans | None = None


def active() -> bool:
    """True once an SDK (or any real) tracer provider is set in this process."""
    global _real_tracer, _send_spans
    if _real_tracer is not None:
        return True
    if _provider_set is not None and _provider_set() is None:
        return False
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return False
    _real_tracer = provider.get_tracer("eventbus")
    _send_spans = send_span.for_tracer(_real_tracer)
    return True


def _provider_global() -> Callable[[], object] | None:
    """A cheap "is a tracer provider set yet?" for `active()`, or None to ask the API each time.

    Until a provider is set, ``trace.get_tracer_provider()`` looks
    ``OTEL_PYTHON_TRACER_PROVIDER`` up in the environment on every call: most of what a
    publish with tracing off paid for tracing. The API keeps the provider in a module
    global, which says "none" at once. Not used when a provider is named in the environment
    (the API's call loads it) or the global is not there under that name (another version).
    """
    if OTEL_PYTHON_TRACER_PROVIDER in os.environ or not hasattr(trace, "_TRACER_PROVIDER"):
        return None
    return lambda: trace._TRACER_PROVIDER


_provider_set = _provider_global()


class TraceFields(dict[str, str]):
    """Envelope trace fields written by :func:`trace_fields` from a valid span context: its
    ``traceparent`` is in the W3C format by construction, so the envelope checks its length
    only, not its pattern."""

    __slots__ = ()


def trace_fields(span_context: SpanContext | None = None) -> dict[str, str]:
    """The trace context as envelope fields, or ``{}`` outside a recorded span.

    ``span_context`` defaults to the current span's. The fields are what the W3C propagator
    (``TraceContextTextMapPropagator.inject``) writes into its two headers, written here
    from the span context directly, without the propagator's look-up of the current span.
    """
    if span_context is None:
        current = otel_context.get_current()
        if not current:  # nothing in the context, so no span either (the common case, untraced)
            return {}
        span_context = trace.get_current_span(current).get_span_context()
    if not span_context.is_valid:
        return {}
    fields = TraceFields(traceparent=traceparent(span_context.trace_id, span_context.span_id, span_context.trace_flags))
    if span_context.trace_state:
        fields["tracestate"] = span_context.trace_state.to_header()
    return fields


# "-00" to "-ff": the trace flags' part of a traceparent.
_FLAGS_HEX = tuple(f"-{flags:02x}" for flags in range(256))


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C ``traceparent`` of valid ids (those of a valid span context): ``00-<trace
    id>-<span id>-<flags>``, in lower-case hex.

    Written as the propagator writes it, at half the cost of a format string: a publish
    writes one before its command can go out.
    """
    # Flags past a byte (a span context made by hand) as the propagator writes them.
    end = _FLAGS_HEX[flags] if 0 <= flags <= 0xFF else f"-{flags:02x}"
    return f"00-{trace_id.to_bytes(16, 'big').hex()}-{span_id.to_bytes(8, 'big').hex()}{end}"


# The name and attributes every span of one kind starts with are built once per event type
# (and handler), not on every publish or run; shared, so never changed (the SDK copies them).
@functools.lru_cache(maxsize=10_000)
def _send_of(event_type: str) -> tuple[str, dict[str, Any]]:
    """A publish span's name and attributes, before the event id is known."""
    return f"send {event_type}", {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": event_type,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
    }


class _SpanBlock:
    """A span for a ``with`` block, without ``start_as_current_span``'s generator-based
    context managers: a subclass's ``__enter__`` starts it and calls :meth:`_current` to make
    it the current span; on the way out an error is recorded
    (:meth:`_is_error`), the span is made no longer current if it was, and ended."""

    __slots__ = ("_span", "_token")

    def __init__(self) -> None:
        self._span: Span | None = None
        self._token: object = None

    def _current(self, span: Span) -> Span:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def _is_error(self, exc: BaseException) -> bool:
        # As use_span: only an Exception is an error; a BaseException (GeneratorExit, a
        # cancellation) is not.
        return isinstance(exc, Exception)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if span is None:
            return
        try:
            if exc is not None and self._is_error(exc) and span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        finally:
            if self._token is not None:
                otel_context.detach(self._token)  # type: ignore[arg-type]
            span.end()


def start_send(event_type: str) -> tuple[Span | None, dict[str, str]]:
    """Start the PRODUCER span of a publish of ``event_type`` (never current); return it, and
    its context as envelope fields. Tracing must be :func:`active`.

    Not a ``with`` block: a publish pays for a block's objects and calls in full (see
    "Performance" in the README). Not made current: nothing inside a publish makes spans of
    its own, and the envelope takes the span's context directly. The span is None
    when it records nothing (the sampler's decision): nothing to end, and its context is
    written straight from its ids. Otherwise the caller sets its attributes, records an
    error with :func:`fail_send`, and ends it.
    """
    assert _real_tracer is not None
    name, attributes = _send_of(event_type)
    begun = None if _send_spans is None else _send_spans.begin(name, attributes)
    if begun is not None:
        span, trace_id, span_id, flags, state = begun
        fields = TraceFields(traceparent=traceparent(trace_id, span_id, flags))
        if state:
            fields["tracestate"] = state.to_header()
        return span, fields
    made = _real_tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)
    if not made.is_recording():
        made.end()
        return None, trace_fields(made.get_span_context())
    return made, trace_fields(made.get_span_context())


def fail_send(span: Span, exc: BaseException) -> None:
    """Record ``exc``, which ends a publish, on its span (as ``use_span`` does: an
    ``Exception`` is an error, a ``BaseException`` such as a cancellation is not)."""
    if isinstance(exc, Exception) and span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))


@functools.lru_cache(maxsize=10_000)
def _attributes_of_process(event_type: str, handler: str, queue: str) -> dict[str, Any]:
    """A handler span's, before the event's own (its id, its conversation) go into a copy."""
    return {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": event_type,
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.destination.subscription.name": handler,
        "messaging.consumer.group.name": queue,
    }


class _HandlerSpan(_SpanBlock):
    """The CONSUMER span a handler runs in (:func:`handler_span`)."""

    __slots__ = ("_event", "_handler", "_ignore", "_queue")

    def __init__(
        self, event: Mapping[str, Any], handler: str, queue: str, ignore: tuple[type[BaseException], ...]
    ) -> None:
        super().__init__()
        self._event, self._handler, self._queue, self._ignore = event, handler, queue, ignore

    def __enter__(self) -> Span | None:
        if not active():
            return None
        assert _real_tracer is not None
        event = self._event
        event_type = str(event.get("event_type"))
        attributes = dict(_attributes_of_process(event_type, self._handler, self._queue))
        attributes["messaging.message.id"] = str(event.get("event_id"))
        if event.get("correlation_id"):
            attributes["messaging.message.conversation_id"] = str(event["correlation_id"])
        parent, links = _parent(event)
        return self._current(
            _real_tracer.start_span(
                f"process {event_type}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
                record_exception=False,
                set_status_on_exception=False,
            )
        )

    def _is_error(self, exc: BaseException) -> bool:
        # Any exception but control flow (a copy skipped), a BaseException included: a
        # handler cut short by a time limit or a lost worker failed.
        return not isinstance(exc, self._ignore)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if span is not None and exc is not None and self._is_error(exc):
            _failed_run.last = (self._event.get("event_id"), span.get_span_context())
        super().__exit__(exc_type, exc, tb)


def handler_span(
    event: Mapping[str, Any], handler: str, queue: str, ignore: tuple[type[BaseException], ...] = ()
) -> _HandlerSpan:
    """The CONSUMER span a handler runs in, a child of the span that published ``event``.

    ``with handler_span(...) as span:`` (None when tracing is off). When a span is already
    current (Celery's instrumentation runs the task in one), the handler's span is its child
    instead; a link points to the publishing span if that one is in another trace. An
    exception in ``ignore`` is control flow (a copy skipped), not an error of the span; any
    other, a BaseException included, is recorded and sets the span's status to ERROR.
    """
    return _HandlerSpan(event, handler, queue, ignore)


# The last handler span of this thread that ended in an error, with its event's id: what is
# published about that failure once the run is over continues the trace under it.
_failed_run = threading.local()


class _Within:
    """``context`` made current for a ``with`` block (nothing, if None)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: Context | None) -> None:
        self._context = context
        self._token: object = None

    def __enter__(self) -> None:
        if self._context is not None:
            self._token = otel_context.attach(self._context)

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


def after_handling(event: Mapping[str, Any]) -> _Within:
    """For a ``with`` block that publishes about ``event`` after its handler ran (the report
    that a delivery is dead, from ``on_failure``): what it publishes continues the event's
    trace, under the handler span that failed last in this thread, or else (a run in another
    process: a hard time limit) under the span that published the event. A span already
    current, as Celery's instrumentation keeps one, is left as it is.
    """
    if not active() or trace.get_current_span().get_span_context().is_valid:
        return _Within(None)
    last = getattr(_failed_run, "last", None)
    if last is not None and last[0] == event.get("event_id"):
        return _Within(trace.set_span_in_context(NonRecordingSpan(last[1])))
    carrier = {k: event[k] for k in TRACE_FIELDS if isinstance(event.get(k), str)}
    return _Within(_PROPAGATOR.extract(carrier) if carrier else None)


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
