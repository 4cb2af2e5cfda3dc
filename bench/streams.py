"""A stream of events as publish leaves it, and a router timed over it in this process."""

from __future__ import annotations

import time
from typing import Any

import redis

from bench.harness import create_group, wipe
from project.bus import EventBus
from project.events import event_bus
from project.keys import ROUTER_GROUP
from project.router import Router
from project.settings import get_settings

__all__ = ["fill_stream", "registry_bus", "router_rate"]


def registry_bus(total: int) -> EventBus:
    """A bus with ``total`` subscriptions, three of which match bench.item.made."""
    from bench import handlers

    bus = EventBus(get_settings())
    for handler in (handlers.count_a, handlers.count_b, handlers.count_c):
        bus.subscribe("bench.item.made", handler, queue=handlers.QUEUE)
    for i in range(total - len(bus.registry)):
        bus.subscribe(f"other{i}.thing.done", name=f"bench.filler_{i}", queue="bench")(_noop)
    return bus


def _noop(event: dict[str, Any]) -> None:
    pass


# What publish leaves behind (project.bus): the entry, and its event_id's dedup key holding
# the entry id, which the router reads for every entry. Not its PUBLISH: nobody listens here.
_FILL_LUA = """
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return 1
"""


def fill_stream(client: redis.Redis, n: int, event_type: str = "bench.item.made") -> None:
    """Append ``n`` events to the stream as publish would, without ``n`` round trips."""
    bus = event_bus
    window = bus.settings.events_dedup_window_s
    pipe = client.pipeline(transaction=False)
    script = client.register_script(_FILL_LUA)
    for i in range(n):
        event_id, encoded = bus._encode(event_type, {"i": i}, None, "bench")
        script(keys=[bus.keys.stream, bus.keys.published(event_id)], args=[encoded, window], client=pipe)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def router_rate(bus: EventBus, n: int) -> float:
    """Events a second one router (in this process) dispatches for ``bus``'s subscriptions.

    Starts from an empty prefix and leaves one: the stream, the Celery queues nothing
    consumes, the log buffer and the dedup keys the router sets are all wiped.
    """
    client = event_bus.sync_client()
    wipe(client)
    fill_stream(client, n)
    create_group(client, bus.keys.stream, ROUTER_GROUP)
    settings = get_settings()
    router = Router(settings, bus.registry, consumer="bench", client=client)
    start = time.perf_counter()
    # The router's own loop, minus blocking and housekeeping: read a batch, dispatch it.
    while reply := _read(client, bus.keys.stream, router.consumer, settings.router_batch_size):
        router.dispatch(reply[0][1])
    elapsed = time.perf_counter() - start
    assert router.stats.entries == n, router.stats
    wipe(client)
    return n / elapsed


def _read(client: redis.Redis, stream: str, consumer: str, count: int) -> Any:
    return client.xreadgroup(ROUTER_GROUP, consumer, {stream: ">"}, count=count)
