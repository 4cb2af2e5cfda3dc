"""The sending side of :mod:`bench.commands`, a process of its own, driven one line at a time.

``python -m bench.command_driver`` reads ``<mode> <kind> <count>`` lines on stdin:

- kind ``publish``: ``publish_sync("bench.pair.made")``, an event two handlers subscribe to
  (two handler runs); ``apply``: ``bench.tasks.count.apply_async(queue="bench")``, the bare
  task (one run). Every handler and the task do the same single INCR of the done counter;
- mode ``lockstep``: send one, wait until its runs are counted, then the next (every event
  travels alone); ``burst``: send all ``count`` back to back, then wait for all of them.

It answers each line with a JSON line: the Redis commands it sent itself, by name (the GETs
polling the done counter, which :mod:`bench.commands` takes off the server's counts), and
the seconds it took. It runs with the ``REDIS_URL`` and ``EVENTS_PREFIX`` it is given, like
any publisher, so it does not import :mod:`bench.harness`, which would set a prefix of its own.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable

from bench.tasks import count
from project.events import event_bus

__all__ = ["EVENT_TYPE", "RUNS", "drive", "main"]

EVENT_TYPE = "bench.pair.made"  # bench.handlers.pair_a and pair_b
RUNS = {"publish": 2, "apply": 1}  # handler runs per send
POLL_S = 0.001


def main() -> int:
    """Answer every ``<mode> <kind> <count>`` line, until stdin closes."""
    sends: dict[str, Callable[[], object]] = {
        "publish": lambda: event_bus.publish_sync(EVENT_TYPE),
        "apply": lambda: count.apply_async(queue="bench"),
    }
    for line in sys.stdin:
        mode, kind, n = line.split()
        start = time.perf_counter()
        own = drive(mode, sends[kind], RUNS[kind], int(n))
        print(json.dumps({"own": own, "seconds": time.perf_counter() - start}), flush=True)
    return 0


def drive(mode: str, send: Callable[[], object], runs: int, n: int) -> Counter[str]:
    """Call ``send`` ``n`` times in ``mode``, each worth ``runs`` runs; the commands sent to wait, by name."""
    client = event_bus.sync_client()
    done_key = f"{event_bus.keys.prefix}:bench:done"
    own = Counter[str]()

    def wait_for(target: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            own["get"] += 1
            if int(client.get(done_key) or 0) >= target:  # type: ignore[arg-type]
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the runs were not counted in time")
            time.sleep(POLL_S)

    own["get"] += 1
    target = int(client.get(done_key) or 0)  # type: ignore[arg-type]
    for _ in range(n):
        send()
        target += runs
        if mode == "lockstep":
            wait_for(target)
    wait_for(target)
    return own


if __name__ == "__main__":
    sys.exit(main())
