"""Observability: Prometheus metrics (:mod:`.metrics`, served by :mod:`.exposition`, with the
Redis-side gauges of :mod:`.gauges`) and OpenTelemetry traces (:mod:`.tracing`).

Both are off until a process turns them on: metrics with ``METRICS_ENABLED``, traces when the
OpenTelemetry SDK is configured (the standard ``OTEL_*`` variables). Off, every hook is a
check of one module global.
"""
