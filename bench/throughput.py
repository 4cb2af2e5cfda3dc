"""End-to-end throughput: events through router and workers against apply_async of the same no-op."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import redis

from bench.harness import Result, result
from bench.stack import DONE_KEY, wait_until
from project.events import event_bus

__all__ = ["bench_throughput"]


def bench_throughput(client: redis.Redis, n: int) -> list[Result]:
    """Time to drain ``n`` events (one handler each) against ``n`` tasks, on a running stack."""
    from bench.tasks import count

    def drain(send_all: Callable[[], object]) -> float:
        client.delete(DONE_KEY)
        start = time.perf_counter()
        send_all()
        wait_until(lambda: int(client.get(DONE_KEY) or 0) >= n, 300)
        return n / (time.perf_counter() - start)

    pairs = [
        (
            drain(lambda: [event_bus.publish_sync("bench.one.made") for _ in range(n)]),
            drain(lambda: [count.apply_async(queue="bench") for _ in range(n)]),
        )
        for _ in range(3)
    ]
    return [
        result("throughput end to end", statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
               0.8, "events/s", note="no-op handlers, 2 worker processes, router and log writer alongside")
    ]  # fmt: skip
