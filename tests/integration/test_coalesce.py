"""Concurrent ``await publish`` calls share round trips, and each still gets its own outcome."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import redis

from project.bus import EventBus
from project.coalesce import EARLY_SEND_EVENTS
from project.errors import PublishOutcomeUnknown, PublishRefused
from project.settings import Settings
from tests.integration.redis_server import redis_server


def _bus(url: str) -> EventBus:
    return EventBus(Settings(redis_url=url, events_prefix=f"co{uuid.uuid4().hex[:8]}", event_contract_modules=[]))


def test_concurrent_publishes_share_round_trips_and_each_is_stored(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> list[str]:
            try:
                await bus.publish("load.item.made", {"n": -1})  # connects and loads the script
                client.config_resetstat()
                return list(await asyncio.gather(*(bus.publish("load.item.made", {"n": n}) for n in range(200))))
            finally:
                await bus.aclose()

        ids = asyncio.run(main())
        runs = client.info("commandstats")["cmdstat_evalsha"]["calls"]
        entries = client.xrange(bus.keys.stream)
        assert len(set(ids)) == 200 and len(entries) == 201  # each call's own event, stored once
        assert sorted(json.loads(f[b"e"])["data"]["n"] for _, f in entries) == list(range(-1, 200))
        # 200 calls in a handful of script runs: the first alone, then batches of EARLY_SEND_EVENTS
        # written as they fill, then what is left at the end of the turn
        assert 200 // EARLY_SEND_EVENTS <= runs <= 200 // EARLY_SEND_EVENTS + 3, runs


def test_a_batch_whose_connection_breaks_after_redis_stored_it_is_sent_again_and_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after Redis ran a batch's script, before its reply is read: the
    batch goes again through the client (its retry), and the script's dedup keys hand back
    the ids of the first run."""
    real = redis.asyncio.connection.Connection.read_response
    broken: list[int] = []

    async def read_then_break(self: redis.asyncio.connection.Connection, *args: object, **kwargs: object) -> object:
        reply = await real(self, *args, **kwargs)  # type: ignore[arg-type]
        if isinstance(reply, list) and len(reply) >= EARLY_SEND_EVENTS and len(broken) < 2:
            broken.append(len(reply))
            await self.disconnect()
            raise redis.ConnectionError("connection lost while reading the batch's reply")
        return reply

    monkeypatch.setattr(redis.asyncio.connection.Connection, "read_response", read_then_break)
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> list[str]:
            try:
                await bus.publish("load.item.made", {"n": -1})
                return list(await asyncio.gather(*(bus.publish("load.item.made", {"n": n}) for n in range(100))))
            finally:
                await bus.aclose()

        ids = asyncio.run(main())
        assert len(broken) == 2  # two batches lost their reply
        entries = client.xrange(bus.keys.stream)
        assert len(set(ids)) == 100 and len(entries) == 101  # every call has its id, each event stored once
        assert sorted(json.loads(f[b"e"])["data"]["n"] for _, f in entries) == list(range(-1, 100))


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


def test_a_large_batch_is_cut_into_script_runs_and_each_event_is_broadcast_on_its_own_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("project.coalesce.MAX_CALL_EVENTS", 40)  # 300 calls: 8 runs, one round trip
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(bus.keys.channel_pattern)
        pubsub.get_message(timeout=1)

        async def main() -> list[str]:
            try:
                await bus.publish("load.item.made", {"n": -1})
                types = [f"load.kind{n % 3}.made" for n in range(300)]
                texts = [f"line one\nline {n}\r\n" + "x" * (n * 7) for n in range(300)]
                return list(
                    await asyncio.gather(
                        *(
                            bus.publish(t, {"n": n, "text": s})
                            for n, (t, s) in enumerate(zip(types, texts, strict=True))
                        )
                    )
                )
            finally:
                await bus.aclose()

        ids = asyncio.run(main())
        entries = {json.loads(f[b"e"])["event_id"]: json.loads(f[b"e"]) for _, f in client.xrange(bus.keys.stream)}
        assert len(set(ids)) == 300 and set(ids) <= set(entries)
        for n, event_id in enumerate(ids):
            assert entries[event_id]["data"]["n"] == n and entries[event_id]["event_type"] == f"load.kind{n % 3}.made"
        broadcast = {}
        while len(broadcast) < 301:
            message = pubsub.get_message(timeout=5)
            assert message is not None, f"only {len(broadcast)} broadcasts"
            envelope = json.loads(message["data"])
            assert message["channel"].decode() == bus.keys.channel(envelope["event_type"])
            broadcast[envelope["event_id"]] = envelope
        assert broadcast == entries
        pubsub.close()


def test_a_cancelled_call_leaves_the_others_of_its_round_trip_alone(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)

        async def main() -> list[object]:
            try:
                await bus.publish("load.item.made", {"n": -1})
                tasks = [asyncio.ensure_future(bus.publish("load.item.made", {"n": n})) for n in range(30)]
                await asyncio.sleep(0)  # every call has been made; cancel a few of them under way
                for task in tasks[5:30:5]:
                    task.cancel()
                return list(await asyncio.gather(*tasks, return_exceptions=True))
            finally:
                await bus.aclose()

        outcomes = asyncio.run(main())
        cancelled = [i for i, o in enumerate(outcomes) if isinstance(o, asyncio.CancelledError)]
        assert cancelled == [5, 10, 15, 20, 25]
        stored = [o for o in outcomes if isinstance(o, str)]
        assert len(stored) == 25
        entries = redis.Redis.from_url(url).xrange(bus.keys.stream)
        assert {json.loads(f[b"e"])["event_id"] for _, f in entries} >= set(stored)
