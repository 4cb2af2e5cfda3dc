"""Concurrent ``await publish`` calls share round trips, and each still gets its own outcome."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis

from project.bus import EventBus
from project.coalesce import Coalescer
from project.errors import PublishOutcomeUnknown, PublishRefused
from project.settings import Settings
from tests.integration.redis_server import redis_server


def _bus(url: str) -> EventBus:
    return EventBus(Settings(redis_url=url, events_prefix=f"co{uuid.uuid4().hex[:8]}", event_contract_modules=[]))


def test_concurrent_publishes_share_round_trips_and_each_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips: list[int] = []
    real = Coalescer._round_trip

    async def counted(self: Coalescer, calls: list[object]) -> list[object]:
        trips.append(len(calls))
        return await real(self, calls)  # type: ignore[arg-type]

    monkeypatch.setattr(Coalescer, "_round_trip", counted)
    with redis_server(tmp_path) as url:
        bus = _bus(url)

        async def main() -> list[str]:
            try:
                await bus.publish("load.item.made", {"n": -1})  # connects and loads the script
                trips.clear()
                return list(await asyncio.gather(*(bus.publish("load.item.made", {"n": n}) for n in range(200))))
            finally:
                await bus.aclose()

        ids = asyncio.run(main())
        client = redis.Redis.from_url(url)
        entries = client.xrange(bus.keys.stream)
        assert len(set(ids)) == 200 and len(entries) == 201  # each call's own event, stored once
        assert sum(trips) == 200 and len(trips) < 20, trips  # 200 calls in a handful of round trips


def test_one_refused_event_fails_only_its_own_call(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        bad = str(uuid.uuid4())
        client = redis.Redis.from_url(url)
        client.hset(bus.keys.published(bad), "x", "1")  # its dedup key has the wrong type: WRONGTYPE

        async def main() -> list[object]:
            calls = [bus.publish("load.item.made", {"n": n}) for n in range(20)]
            calls.insert(10, bus.publish("load.item.made", {"n": -1}, event_id=bad))
            try:
                return list(await asyncio.gather(*calls, return_exceptions=True))
            finally:
                await bus.aclose()

        outcomes = asyncio.run(main())
        assert isinstance(outcomes[10], PublishRefused)
        assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 10)
        assert client.xlen(bus.keys.stream) == 20


def test_a_lost_script_is_loaded_again_for_the_whole_batch(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> None:
            try:
                await bus.publish("load.item.made", {"n": 0})
                client.script_flush()  # a Redis restarted without its scripts
                await asyncio.gather(*(bus.publish("load.item.made", {"n": n}) for n in range(1, 30)))
            finally:
                await bus.aclose()

        asyncio.run(main())
        assert client.xlen(bus.keys.stream) == 30


def test_a_broken_connection_fails_every_call_of_the_round_trip_with_its_own_event_id(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> list[object]:
            try:
                await bus.publish("load.item.made", {"n": 0})  # connected
                client.shutdown(nosave=True)  # Redis goes away under the next round trip
                ids = [str(uuid.uuid4()) for _ in range(10)]
                return (
                    list(
                        await asyncio.gather(
                            *(bus.publish("load.item.made", {"n": 1}, event_id=i) for i in ids), return_exceptions=True
                        )
                    )
                    + ids
                )
            finally:
                await bus.aclose()

        results = asyncio.run(main())
        outcomes, ids = results[:10], results[10:]
        assert all(isinstance(o, PublishOutcomeUnknown) for o in outcomes), outcomes
        assert [o.event_id for o in outcomes if isinstance(o, PublishOutcomeUnknown)] == ids
