"""Subscription matching: the router with 10,000 subscriptions against the same router with 10."""

from __future__ import annotations

import statistics

from bench.harness import Result, result
from bench.streams import registry_bus, router_rate

__all__ = ["bench_matching"]


def bench_matching(n: int, rounds: int) -> list[Result]:
    """Router events a second over ``n`` events, 10,000 subscriptions against 10 (3 match each time)."""
    big, small = registry_bus(10_000), registry_bus(10)
    pairs = [(router_rate(big, n), router_rate(small, n)) for _ in range(rounds)]
    return [
        result("matching: 10,000 vs 10 subscriptions", statistics.median(p[0] for p in pairs),
               statistics.median(p[1] for p in pairs), 0.8, "events/s (router)")
    ]  # fmt: skip
