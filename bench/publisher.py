"""A publishing process for :mod:`bench.observability`, driven one line at a time.

``python -m bench.publisher [--observed] [--cpu N]`` reads ``<event_type> <count>`` lines on
stdin, publishes ``count`` events with ``publish_sync`` and answers each with the rate it
reached (events/s) on a line of stdout. ``--observed`` first turns metrics on (a registry of
the process's own, as a router's) and tracing on (:mod:`bench.null_tracing`), so that each
publish runs in a span, counts itself and carries its trace context. ``--cpu`` pins the
process to that CPU (see :mod:`bench.observability`).

It runs with the ``EVENTS_PREFIX`` it is given, so it does not import :mod:`bench.harness`,
which would set a prefix of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from project.events import event_bus

__all__ = ["main"]

DATA = {"kp_index": 8, "severity": "G4", "user_id": 42}


def main(argv: list[str] | None = None) -> int:
    """Answer every ``<event_type> <count>`` line with the publish rate, until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--observed", action="store_true", help="metrics and tracing on")
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.observed:
        from prometheus_client import CollectorRegistry

        import bench.null_tracing  # noqa: F401  (installs the SDK)
        from project.observability import metrics

        metrics.enable(CollectorRegistry())
    for line in sys.stdin:
        event_type, count = line.split()
        n = int(count)
        start = time.perf_counter()
        for _ in range(n):
            event_bus.publish_sync(event_type, DATA)
        print(n / (time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
