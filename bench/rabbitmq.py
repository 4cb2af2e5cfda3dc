"""Celery's queues on RabbitMQ: the router's dispatch and the end-to-end latency, each against
bare Celery on the same RabbitMQ.

Settings are read once per process, so the RabbitMQ figures are measured in a child process
(``python -m bench.rabbitmq``) whose environment names a vhost made for the run
(``CELERY_BROKER_URL``); it shares this run's prefix and database (``BENCH_PREFIX``) and
prints its results as JSON. Both sides wait for RabbitMQ's publisher confirms: the router
for each batch, Celery for each ``apply_async`` (``confirm_publish``, as celeryconfig sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import asdict
from typing import Any

from bench.amqp import amqp_vhost
from bench.harness import ROOT, Result

__all__ = ["bench_rabbitmq"]

EVENT_TYPE = "bench.item.made"


def bench_rabbitmq(n: int, baseline_n: int, rounds: int, duration_s: float, rate_per_s: float) -> list[Result]:
    """Run the RabbitMQ rows in a child process on a vhost of their own; return its results."""
    with amqp_vhost(f"eventbus-bench-{uuid.uuid4().hex[:8]}") as url:
        env = {**os.environ, "CELERY_BROKER_URL": url}
        args = json.dumps([n, baseline_n, rounds, duration_s, rate_per_s])
        out = subprocess.run(
            [sys.executable, "-m", "bench.rabbitmq", args], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=1800, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"the RabbitMQ benchmark failed:\n{out.stderr[-4000:]}")
        return [Result(**row) for row in json.loads(out.stdout.strip().splitlines()[-1])]


def _child(n: int, baseline_n: int, rounds: int, duration_s: float, rate_per_s: float) -> list[Result]:
    import statistics

    from bench.harness import MACHINE, machine, rate, result, wipe
    from bench.latency import bench_latency
    from bench.stack import end_to_end
    from bench.streams import registry_bus, router_rate
    from project.broker import AmqpSender
    from project.celery_app import app
    from project.delivery import register_tasks
    from project.events import event_bus

    MACHINE.update(machine())
    settings = event_bus.settings
    assert settings.broker_is_amqp, "CELERY_BROKER_URL must name RabbitMQ here"
    bus = registry_bus(1000)
    client = event_bus.sync_client()
    register_tasks(app, bus)
    tasks = [app.tasks[s.name] for s in bus.registry.match(EVENT_TYPE)]
    envelope = json.loads(bus._encode(EVENT_TYPE, {"i": 0}, None, "bench")[1])
    queues = {s.queue for s in bus.registry.match(EVENT_TYPE)}

    def purge() -> None:
        sender = AmqpSender(settings)
        try:
            for q in queues:
                sender.purge(q)
        finally:
            sender.close()

    def ours() -> float:
        r = router_rate(bus, n) * len(tasks)
        purge()
        return r

    def apply_async_loop() -> float:
        def run() -> None:
            for _ in range(baseline_n):
                for task in tasks:
                    task.apply_async(args=[envelope])

        r = rate(baseline_n * len(tasks), run)
        wipe(client)
        purge()
        return r

    pairs = [(ours(), apply_async_loop()) for _ in range(rounds)]
    o, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    results = [
        result("rabbitmq: dispatch vs apply_async", o, b, 2.0, "Celery messages/s",
               note="one router, confirms per batch; apply_async with confirm_publish; 3 of 1,000 "
                    "subscriptions match each event"),
    ]  # fmt: skip
    with end_to_end() as redis_client:
        for row in bench_latency(redis_client, duration_s, rate_per_s):
            if "stage" in row.name:  # the stages name Redis' LPUSH: not this path's
                continue
            row.name = f"rabbitmq: {row.name}"
            results.append(row)
    return results


if __name__ == "__main__":
    counts: Any = json.loads(sys.argv[1])
    rows = _child(*counts)
    print(json.dumps([asdict(r) for r in rows]))
