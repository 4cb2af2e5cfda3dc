"""Set up the OpenTelemetry SDK in a process when the standard ``OTEL_*`` variables ask for it.

``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ... comma-separated; ``none``: off), or an
OTLP endpoint alone (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
which means ``otlp``), turns exporting on; the SDK and exporters read the rest of their
variables themselves. A provider set already (``opentelemetry-instrument``, the application)
is left alone. With none of these set nothing is imported from the SDK and nothing exported.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace

from project.observability.tracing import active
from project.settings import Settings

__all__ = ["configure", "exporter_names", "flush"]

log = logging.getLogger("eventbus.tracing")

_EXPORTERS_GROUP = "opentelemetry_traces_exporter"  # where exporter packages register


def exporter_names(settings: Settings) -> list[str]:
    """The exporters ``OTEL_*`` asks for (empty: export nothing)."""
    if settings.otel_sdk_disabled:
        return []
    if settings.otel_traces_exporter:  # empty is unset, as the OpenTelemetry specification has it
        names = [n.strip() for n in settings.otel_traces_exporter.split(",") if n.strip()]
        return [n for n in names if n != "none"]
    if settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint:
        return ["otlp"]
    return []


def _exporter(name: str) -> Any:
    found = {ep.name: ep for ep in entry_points(group=_EXPORTERS_GROUP)}
    # "otlp" is the gRPC package's name; the HTTP one (eventbus[otel]) serves it when alone.
    entry = found.get(name) or (found.get("otlp_proto_http") if name == "otlp" else None)
    if entry is None:
        raise LookupError(f"no OpenTelemetry traces exporter {name!r} is installed (have: {sorted(found)})")
    return entry.load()()


def configure(settings: Settings, service_name: str) -> bool:
    """Install an SDK tracer provider exporting as ``OTEL_*`` says; return whether one was installed.

    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` names the service.
    """
    names = exporter_names(settings)
    if not names or active():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* asks for traces, but opentelemetry-sdk is not installed (pip install 'eventbus[otel]')")
        return False
    try:
        exporters = [_exporter(name) for name in names]
    except LookupError as exc:
        log.error("tracing stays off: %s", exc)
        return False
    resource = Resource.create({} if settings.otel_service_name else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans of %s with %s", service_name, ", ".join(names))
    return True


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still batched in this process (a pool child about to exit)."""
    provider: Any = trace.get_tracer_provider()
    if active() and hasattr(provider, "force_flush"):
        provider.force_flush(timeout_ms)
