"""The router's dispatch against Celery's own ways of sending the same tasks."""

from __future__ import annotations

import json
import statistics

from bench.harness import Result, rate, result, wipe
from bench.streams import registry_bus, router_rate
from project.celery_app import app
from project.delivery import register_tasks
from project.events import event_bus

__all__ = ["bench_dispatch"]

EVENT_TYPE = "bench.item.made"


def bench_dispatch(n: int, baseline_n: int, rounds: int) -> list[Result]:
    """Celery messages a second: the router over ``n`` events, ``apply_async`` and celery-pubsub over ``baseline_n``."""
    import celery_pubsub

    bus = registry_bus(1000)
    client = event_bus.sync_client()
    register_tasks(app, bus)
    matching = bus.registry.match(EVENT_TYPE)
    tasks = [app.tasks[s.name] for s in matching]
    for task in tasks:
        celery_pubsub.subscribe(EVENT_TYPE, task)
    envelope = json.loads(bus._encode(EVENT_TYPE, {"i": 0}, None, "bench")[1])

    def ours() -> float:
        return router_rate(bus, n) * len(matching)

    def apply_async_loop() -> float:
        def run() -> None:
            for _ in range(baseline_n):
                for task in tasks:
                    task.apply_async(args=[envelope])

        r = rate(baseline_n * len(tasks), run)
        wipe(client)
        return r

    def pubsub() -> float:
        r = rate(
            baseline_n * len(tasks),
            lambda: [celery_pubsub.publish(EVENT_TYPE, envelope) for _ in range(baseline_n)],
        )
        wipe(client)
        return r

    triples = [(ours(), apply_async_loop(), pubsub()) for _ in range(rounds)]
    o = statistics.median(t[0] for t in triples)
    a = statistics.median(t[1] for t in triples)
    p = statistics.median(t[2] for t in triples)
    return [
        result("dispatch vs apply_async", o, a, 2.0, "Celery messages/s",
               note="one router, 3 of 1,000 subscriptions match each event"),
        result("dispatch vs celery-pubsub", o, p, None, "Celery messages/s",
               note="celery_pubsub.publish of the same events to the same 3 tasks"),
    ]  # fmt: skip
