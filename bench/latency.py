"""Latency from publish to handler start, against apply_async to task start, on the same workers."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from bench.harness import Result, result
from bench.stack import LATENCY_KEY, paced, wait_until
from project.events import event_bus

__all__ = ["bench_latency"]

# Three alternating windows a side, so a noisy stretch of the machine lands on both sides
# instead of on whichever ran then.
WINDOWS = 3


def bench_latency(client: redis.Redis, duration_s: float, rate_per_s: float) -> list[Result]:
    """p50 and p99 over ``duration_s`` a side at ``rate_per_s``, on a running stack (``bench.stack.end_to_end``)."""
    from bench.tasks import probe

    def latencies(send: Callable[[], object], window_s: float) -> list[float]:
        client.delete(LATENCY_KEY)
        sent = paced(rate_per_s, window_s, send)
        wait_until(lambda: client.llen(LATENCY_KEY) >= sent, 60)
        return [float(v) for v in client.lrange(LATENCY_KEY, 0, -1)]  # type: ignore[union-attr]

    ours: list[float] = []
    base: list[float] = []
    for _ in range(WINDOWS):
        ours += latencies(lambda: event_bus.publish_sync("bench.latency.probe"), duration_s / WINDOWS)
        base += latencies(lambda: probe.apply_async(args=[time.time()], queue="bench"), duration_s / WINDOWS)
    client.delete(LATENCY_KEY)
    results = []
    for q, target in ((0.5, 1.5), (0.99, 2.0)):
        o, b = percentile(ours, q) * 1000, percentile(base, q) * 1000
        note = f"{rate_per_s:.0f}/s for {duration_s:.0f} s in {WINDOWS} alternating windows"
        results.append(result(f"latency p{int(q * 100)}", o, b, target, "ms", lower_is_better=True, note=note))
    return results


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
