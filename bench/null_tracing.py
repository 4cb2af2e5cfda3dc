"""Tracing on, exported nowhere: importing this installs the OpenTelemetry SDK in the process.

Spans are made, ended and handed to a ``BatchSpanProcessor``, as :mod:`project.observability.otel_sdk`
sets it up when ``OTEL_*`` asks for an exporter; the exporter at the end drops them. So the
benchmark pays for every span the bus makes, but for no network and no collector.

The "on" side of :mod:`bench.observability` loads it in its worker and router through
``EVENT_HANDLER_MODULES`` (before the worker's pool forks; the SDK restarts its batching
thread in each child), and in its publisher by import.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["NullExporter"]


class NullExporter(SpanExporter):
    """Accepts every batch of spans and keeps none of them."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


_provider = TracerProvider(resource=Resource.create({"service.name": "eventbus-bench"}))
_provider.add_span_processor(BatchSpanProcessor(NullExporter()))
trace.set_tracer_provider(_provider)
