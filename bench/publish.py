"""publish (sync and async) against a bare Redis PUBLISH of the same JSON."""

from __future__ import annotations

import asyncio
import time

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

    sync = interleaved(ours, baseline, n, rounds)
    wipe(client)  # publish keeps every entry (and its dedup key) until a router acknowledges it
    asynchronous = asyncio.run(_async_pairs(channel, payload, n, rounds))
    wipe(client)
    concurrent = asyncio.run(_concurrent_pairs(channel, payload, n, rounds))
    wipe(client)
    return [
        result("publish (publish_sync)", sync[0], sync[1], 0.8, "events/s", ratio=sync[2],
               note="ratio: median of interleaved chunk pairs"),
        result("publish (await publish)", asynchronous[0], asynchronous[1], 0.7, "events/s", ratio=asynchronous[2],
               note="baseline: redis.asyncio PUBLISH"),
        result(f"publish ({CONCURRENCY} concurrent await publish)", concurrent[0], concurrent[1], 3.0, "events/s",
               ratio=concurrent[2],
               note=f"baseline: {CONCURRENCY} concurrent redis.asyncio PUBLISH; ours coalesce into shared round trips"),
    ]  # fmt: skip


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
