"""``make bench``: every hot path measured against its baseline in the same run.

Runs the benchmarks in order (each its own module over :mod:`bench.harness`), prints a table
and writes ``bench/results.json``. ``--quick`` runs everything with tiny counts (seconds):
the test suite does that so the harness cannot rot.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.cluster import bench_cluster
from bench.commands import bench_commands
from bench.dispatch import bench_dispatch
from bench.explorer import bench_explorer
from bench.harness import (
    MACHINE,
    ROOT,
    Result,
    create_database,
    drop_database,
    machine,
    print_table,
    wipe,
    write_results,
)
from bench.latency import bench_latency
from bench.log_writer import bench_log_writer
from bench.matching import bench_matching
from bench.memory import bench_memory
from bench.observability import bench_observability
from bench.publish import bench_publish
from bench.rabbitmq import bench_rabbitmq
from bench.stack import end_to_end
from bench.throughput import bench_throughput
from project.events import event_bus

__all__ = ["main"]

KEYS = (
    "publish", "dispatch", "matching", "e2e", "commands", "rabbitmq", "cluster", "observability", "logwriter",
    "memory", "explorer",
)  # fmt: skip


def bench_end_to_end(duration_s: float, rate_per_s: float, n: int) -> list[Result]:
    """Latency, then throughput, on one stack of real worker and router processes."""
    with end_to_end() as client:
        return bench_latency(client, duration_s, rate_per_s) + bench_throughput(client, n)


def plan(quick: bool) -> list[tuple[str, Callable[[], list[Result]]]]:
    """Every benchmark in the order it runs, under its ``--only`` key, with its counts."""
    q = quick
    return [
        ("publish", lambda: bench_publish(200 if q else 5_000, 1 if q else 5)),
        ("dispatch", lambda: bench_dispatch(100 if q else 5_000, 30 if q else 1_000, 1 if q else 3)),
        ("matching", lambda: bench_matching(100 if q else 5_000, 1 if q else 3)),
        ("e2e", lambda: bench_end_to_end(1 if q else 30, 50 if q else 200, 100 if q else 2_000)),
        # (events, tasks) in lockstep, then in a burst: as many handler runs a side.
        ("commands", lambda: bench_commands((10, 20) if q else (500, 1_000), (10, 20) if q else (500, 1_000))),
        # Celery's queues on RabbitMQ: dispatch, then latency, against bare Celery there.
        (
            "rabbitmq",
            lambda: bench_rabbitmq(
                100 if q else 5_000, 30 if q else 1_000, 1 if q else 3, 1 if q else 30, 50 if q else 200
            ),
        ),
        # Events on a private Redis Cluster against one private Redis, Celery's queues on RabbitMQ for
        # both: (events per drain, rounds, events counted for commands per event).
        ("cluster", lambda: bench_cluster(60 if q else 9_000, 1 if q else 3, 12 if q else 600)),
        ("observability", lambda: bench_observability(200 if q else 2_500, 50 if q else 800, 1 if q else 6)),
        ("logwriter", lambda: bench_log_writer(200 if q else 20_000, 50 if q else 2_000, 1 if q else 3)),
        ("memory", lambda: bench_memory(100 if q else 1_000, 1_000 if q else 100_000)),
        # BENCH_EXPLORER_EVENTS overrides the count (a quick look at a smaller record).
        ("explorer", lambda: bench_explorer(3_000 if q else 1_000_000, 1 if q else 5)),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (all, or ``--only`` some), print the table and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, measures nothing")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--only", help=f"comma-separated: {','.join(KEYS)}")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only is not None and only - set(KEYS):
        parser.error(f"unknown benchmark {', '.join(sorted(only - set(KEYS)))}: choose from {', '.join(KEYS)}")
    MACHINE.update(machine())
    create_database()
    results: list[Result] = []
    try:
        for key, run in plan(args.quick):
            if only is None or key in only:
                started = time.perf_counter()
                results.extend(run())
                print(f"[{key}: {time.perf_counter() - started:.1f}s]", file=sys.stderr)
    finally:
        wipe(event_bus.sync_client())
        drop_database()
    print_table(results)
    write_results(results, Path(args.output))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
