"""The router's memory: its RSS must not grow with the number of events it has dispatched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.harness import MACHINE, Result, wipe
from bench.stack import processes, router_cmd, rss_kb, wait_until
from bench.streams import fill_stream
from project.events import event_bus

__all__ = ["bench_memory"]

LIMIT_MB = 20


def bench_memory(small: int, large: int) -> list[Result]:
    """RSS of a router process after ``small`` events against after ``large`` (no log writer)."""
    client = event_bus.sync_client()
    wipe(client)
    queue = event_bus.keys.celery_queue("bench")

    def dispatched(count: int) -> Callable[[], bool]:
        def check() -> bool:
            client.delete(queue)  # keep Redis small: nothing consumes these
            groups: Any = client.xinfo_groups(event_bus.keys.stream)
            return bool(groups) and int(groups[0]["entries-read"] or 0) >= count and not groups[0]["pending"]

        return check

    with processes(router_cmd(log_writer=False)) as (router,):
        fill_stream(client, small, "bench.one.made")
        wait_until(dispatched(small), 120)
        before = rss_kb(router.pid)
        fill_stream(client, large - small, "bench.one.made")
        wait_until(dispatched(large), 600)
        after = rss_kb(router.pid)
    wipe(client)
    growth_mb = (after - before) / 1024
    return [Result(f"memory: router RSS growth {small:,} -> {large:,} events", round(growth_mb, 2), None, None,
                   f"under {LIMIT_MB} MB", "MB", growth_mb < LIMIT_MB, MACHINE,
                   note=f"RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB")]  # fmt: skip
