"""End-to-end throughput: events through router and workers against apply_async of the same no-op."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import redis

from bench.cpu import ROLES, CpuMeter
from bench.harness import PREFIX, Result, result
from bench.stack import DONE_KEY, processes, wait_until, warm_up, worker_cmd
from project.events import event_bus

__all__ = ["bench_throughput"]

TARGET = 0.95  # of bare Celery on the same worker (the performance issue, round two)


def bench_throughput(client: redis.Redis, n: int) -> list[Result]:
    """Time to drain ``n`` events (one handler each) against ``n`` tasks, on a running stack.

    Two baselines: the same no-op as a plain task on the same worker (the target's: what the
    dispatcher costs, all else equal), and on a stock Celery worker of its own
    (:mod:`bench.stock_app`: what a team running plain Celery has today).
    """
    from bench.stock_app import QUEUE
    from bench.stock_app import count as stock_count
    from bench.tasks import count

    meter = CpuMeter(f"bench-{PREFIX}@", client.connection_pool.connection_kwargs.get("port", 6379))
    cpu: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}

    def drain(send_all: Callable[[], object], side: str | None = None) -> float:
        client.delete(DONE_KEY)
        with meter.measure() as spent:
            start = time.perf_counter()
            send_all()
            wait_until(lambda: int(client.get(DONE_KEY) or 0) >= n, 300)
            rate = n / (time.perf_counter() - start)
            if side is not None:
                time.sleep(CATCH_UP_S)  # the log writer's last records of the run, counted with it
        if side is not None:
            cpu[side].append({role: seconds * 1000 / n for role, seconds in spent.items()})
        return rate

    stock_worker = worker_cmd(f"stock-{PREFIX}", app="bench.stock_app", queue=QUEUE, imports="")
    with processes(stock_worker, label=f"{PREFIX}-stock"):
        warm_up(client, lambda: stock_count.apply_async(queue=QUEUE))
        rounds = [
            (
                drain(lambda: [event_bus.publish_sync("bench.one.made") for _ in range(n)], "ours"),
                drain(lambda: [count.apply_async(queue="bench") for _ in range(n)], "plain"),
                drain(lambda: [stock_count.apply_async(queue=QUEUE) for _ in range(n)]),
            )
            for _ in range(3)
        ]
    ours = statistics.median(r[0] for r in rounds)
    note = "no-op handlers, 2 worker processes, router and log writer alongside"
    return [
        result("throughput end to end", ours, statistics.median(r[1] for r in rounds), TARGET, "events/s",
               ratio=statistics.median(r[0] / r[1] for r in rounds), note=note + "; baseline: the same worker"),
        result("throughput end to end vs stock Celery", ours, statistics.median(r[2] for r in rounds), None,
               "events/s", ratio=statistics.median(r[0] / r[2] for r in rounds),
               note=note + "; baseline: a stock Celery worker of 2 processes (bench.stock_app)"),
        *_cpu_rows(cpu["ours"], cpu["plain"]),
    ]  # fmt: skip


# After a drain, before its CPU is read: the router's log writer still writes the run's last
# records to PostgreSQL. Both sides wait as long; idle processes spend next to nothing meanwhile.
CATCH_UP_S = 0.5


def _cpu_rows(ours: list[dict[str, float]], plain: list[dict[str, float]]) -> list[Result]:
    """CPU per event by process, ours against the plain task's drain (medians over the rounds)."""

    def per_event(side: list[dict[str, float]], role: str) -> float:
        return statistics.median(sum(r.values()) if role == "total" else r[role] for r in side)

    rows = []
    for role in (*ROLES, "total"):
        mine, theirs = per_event(ours, role), per_event(plain, role)
        rows.append(result(f"throughput CPU per event: {role}", mine, theirs, None, "ms CPU/event",
                           ratio=mine / theirs if theirs else None,
                           note="CPU (user + system) read from /proc over each drain of the throughput rows, "
                                "divided by its events; median of the rounds; baseline: the plain task's drain. "
                                "The /proc clock counts in 10 ms ticks"))  # fmt: skip
    return rows
