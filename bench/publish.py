"""publish (sync and async) against a bare Redis PUBLISH of the same JSON.

Two reference rows split ``publish_sync``'s gap: storing alone (the envelopes built before
the clock starts) against the same PUBLISH, and the envelope's building timed inside the
publish loop (after each call's round trip) against back to back. On a small virtual
machine a round trip idles the CPU and leaves its caches cold, so the Python that runs
after it costs more than the same Python in a tight loop.
"""

from __future__ import annotations

import asyncio
import time

import redis

from bench.harness import Result, interleaved, median_pairs, pair_chunks, rate, result, wipe
from project.bus import EventBus
from project.events import event_bus
from project.settings import get_settings

__all__ = ["bench_publish"]

EVENT_TYPE = "bench.item.made"
DATA = {"kp_index": 8, "severity": "G4", "user_id": 42}
CONCURRENCY = 100


def bench_publish(n: int, rounds: int) -> list[Result]:
    """``publish_sync`` and ``await publish`` against PUBLISH, in interleaved chunks of ``n`` a side."""
    client = event_bus.sync_client()
    payload = event_bus._encode(EVENT_TYPE, DATA, None, None)[1]  # the same JSON ours sends
    channel = event_bus.keys.channel(EVENT_TYPE)

    def ours(count: int) -> float:
        return rate(count, lambda: [event_bus.publish_sync(EVENT_TYPE, DATA) for _ in range(count)])

    def baseline(count: int) -> float:
        return rate(count, lambda: [client.publish(channel, payload) for _ in range(count)])

    def stored(count: int) -> float:
        built = [event_bus._encode(EVENT_TYPE, DATA, None, None) for _ in range(count)]
        return rate(count, lambda: [event_bus.send_encoded(EVENT_TYPE, i, e) for i, e in built])

    sync = interleaved(ours, baseline, n, rounds)
    wipe(client)  # publish keeps every entry (and its dedup key) until a router acknowledges it
    store = interleaved(stored, baseline, n, rounds)
    wipe(client)
    building = _building_us(client, n, rounds)
    asynchronous = asyncio.run(_async_pairs(channel, payload, n, rounds))
    wipe(client)
    concurrent = asyncio.run(_concurrent_pairs(channel, payload, n, rounds))
    wipe(client)
    return [
        result("publish (publish_sync)", sync[0], sync[1], 0.8, "events/s", ratio=sync[2],
               note="ratio: median of interleaved chunk pairs"),
        result("publish (publish_sync): storing alone, envelopes built beforehand", store[0], store[1], None,
               "events/s", ratio=store[2],
               note="the same EVALSHA publish_sync sends, of envelopes built before the clock starts, vs PUBLISH"),
        result("publish (publish_sync): building the envelope, in the publish loop vs back to back", building[0],
               building[1], None, "µs", lower_is_better=True, ratio=building[2],
               note="publish_sync's envelope (EventBus._encode), timed alone: after each call's round trip "
                    "(a PING), against one built right after another; median of chunk pairs"),
        result("publish (await publish)", asynchronous[0], asynchronous[1], 0.7, "events/s", ratio=asynchronous[2],
               note="baseline: redis.asyncio PUBLISH"),
        result(f"publish ({CONCURRENCY} concurrent await publish)", concurrent[0], concurrent[1], 3.0, "events/s",
               ratio=concurrent[2],
               note=f"baseline: {CONCURRENCY} concurrent redis.asyncio PUBLISH; ours coalesce into shared round trips"),
    ]  # fmt: skip


def _building_us(client: redis.Redis, n: int, rounds: int) -> tuple[float, float, float]:
    """µs to build one envelope after a round trip, and back to back: (after, back to back, ratio)."""
    clock = time.perf_counter

    def after_round_trip(count: int) -> float:
        spent = 0.0
        for _ in range(count):
            client.ping()
            start = clock()
            event_bus._encode(EVENT_TYPE, DATA, None, None)
            spent += clock() - start
        return spent / count * 1e6

    def back_to_back(count: int) -> float:
        start = clock()
        for _ in range(count):
            event_bus._encode(EVENT_TYPE, DATA, None, None)
        return (clock() - start) / count * 1e6

    return interleaved(after_round_trip, back_to_back, n, rounds)


async def _async_pairs(channel: str, payload: str, n: int, rounds: int) -> tuple[float, float, float]:
    import redis.asyncio as aredis

    bus = EventBus(get_settings())
    aclient = aredis.Redis.from_url(get_settings().redis_url)
    chunk, count = pair_chunks(n, rounds)
    pairs = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            for _ in range(chunk):
                await bus.publish(EVENT_TYPE, DATA)
            ours = chunk / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(chunk):
                await aclient.publish(channel, payload)
            pairs.append((ours, chunk / (time.perf_counter() - start)))
    finally:
        await bus.aclose()
        await aclient.aclose()
    return median_pairs(pairs)


async def _concurrent_pairs(channel: str, payload: str, n: int, rounds: int) -> tuple[float, float, float]:
    """``CONCURRENCY`` coroutines publishing at once, against as many concurrent PUBLISH calls."""
    import redis.asyncio as aredis

    bus = EventBus(get_settings())
    aclient = aredis.Redis.from_url(get_settings().redis_url)
    chunk, count = pair_chunks(n, rounds)
    waves = max(1, chunk // CONCURRENCY)
    pairs = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            for _ in range(waves):
                await asyncio.gather(*(bus.publish(EVENT_TYPE, DATA) for _ in range(CONCURRENCY)))
            ours = waves * CONCURRENCY / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(waves):
                await asyncio.gather(*(aclient.publish(channel, payload) for _ in range(CONCURRENCY)))
            pairs.append((ours, waves * CONCURRENCY / (time.perf_counter() - start)))
    finally:
        await bus.aclose()
        await aclient.aclose()
    return median_pairs(pairs)
