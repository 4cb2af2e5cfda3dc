"""Collect every finished span of a process in the SDK's in-memory exporter and in Redis.

Imported through ``EVENT_HANDLER_MODULES`` by a router and a worker (before the pool forks),
and by the publishing script of the tracing test: each process installs an SDK tracer
provider whose spans are kept in memory and pushed, as JSON, onto ``<prefix>:test:spans``,
where the test reads the spans of every process. With
``TEST_CELERY_INSTRUMENTATION=worker_process_init`` each pool child of the worker also runs
Celery's own OpenTelemetry instrumentation, set up after the fork as its documentation
recommends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from project.events import event_bus


class _RedisCopyExporter(InMemorySpanExporter):
    """The in-memory exporter, which also hands each span to the test through Redis."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = event_bus.sync_client()
        for span in spans:
            client.rpush(f"{event_bus.keys.prefix}:test:spans", json.dumps(_as_dict(span)))
        return super().export(spans)


def _as_dict(span: ReadableSpan) -> dict[str, object]:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "pid": os.getpid(),
    }


exporter = _RedisCopyExporter()
_provider = TracerProvider(resource=Resource.create({"service.name": "eventbus-test"}))
_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(_provider)


def _instrument_celery(**_: object) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


if os.environ.get("TEST_CELERY_INSTRUMENTATION") == "worker_process_init":
    from celery import signals

    signals.worker_process_init.connect(_instrument_celery, weak=False)
