"""Concurrent ``await publish`` calls share round trips, and each still gets its own outcome."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import redis

from project.bus import PUBLISH_LUA, EventBus
from project.coalesce import EARLY_SEND_EVENTS, Coalescer
from project.errors import PublishOutcomeUnknown, PublishRefused
from project.settings import Settings
from tests.integration.redis_server import redis_server


def _bus(url: str) -> EventBus:
    return EventBus(Settings(redis_url=url, events_prefix=f"co{uuid.uuid4().hex[:8]}", event_contract_modules=[]))


def _stored_once(client: redis.Redis, bus: EventBus, ids: list[str]) -> None:
    """Each of ``ids`` is in the stream exactly once, and its dedup key names that entry."""
    entries = client.xrange(bus.keys.stream)
    by_event = {}
    for entry_id, fields in entries:
        event_id = json.loads(fields[b"e"])["event_id"]
        assert event_id not in by_event, f"{event_id} stored twice"
        by_event[event_id] = entry_id
    assert set(ids) <= set(by_event)
    for event_id in ids:
        assert client.get(bus.keys.published(event_id)) == by_event[event_id]


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
        assert client.xlen(bus.keys.stream) == 201
        _stored_once(client, bus, ids)
        # 200 calls in a handful of script runs: the first alone, then batches of EARLY_SEND_EVENTS
        # written as they fill, then what is left at the end of the turn
        assert 200 // EARLY_SEND_EVENTS <= runs <= 200 // EARLY_SEND_EVENTS + 3, runs


def test_a_batch_whose_reply_is_lost_fails_its_own_calls_only_and_publishing_them_again_stores_none_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection fails after Redis ran a batch's script, before its reply arrives. The
    asyncio client retries nothing by default, so each call of that batch raises
    PublishOutcomeUnknown with its own event_id, the other batches' calls succeed, and
    publishing the failed ones again with their ids stores none of them twice."""
    real = Coalescer._read
    lost: list[int] = []

    async def read_then_lose(self: Coalescer, conn: object, count: int) -> list[object]:
        results = await real(self, conn, count)
        if sum(len(r) for r in results if isinstance(r, list)) >= EARLY_SEND_EVENTS and len(lost) < 2:
            lost.append(sum(len(r) for r in results if isinstance(r, list)))
            raise redis.ConnectionError("connection lost while reading the batch's reply")
        return results

    monkeypatch.setattr(Coalescer, "_read", read_then_lose)
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> list[object]:
            try:
                await bus.publish("load.item.made", {"n": -1})
                calls = [bus.publish("load.item.made", {"n": n}) for n in range(100)]
                outcomes = list(await asyncio.gather(*calls, return_exceptions=True))
                again = [
                    await bus.publish("load.item.made", {"n": -2}, event_id=o.event_id)
                    for o in outcomes
                    if isinstance(o, PublishOutcomeUnknown)
                ]
                return outcomes + again
            finally:
                await bus.aclose()

        outcomes = asyncio.run(main())
        first, again = outcomes[:100], outcomes[100:]
        unknown = [o for o in first if isinstance(o, PublishOutcomeUnknown)]
        assert len(unknown) == sum(lost) == 2 * EARLY_SEND_EVENTS  # the calls of the two batches, no others
        assert all(isinstance(o, str) for o in first if not isinstance(o, PublishOutcomeUnknown))
        assert again == [o.event_id for o in unknown]
        assert client.xlen(bus.keys.stream) == 101  # stored the first time, not again
        _stored_once(client, bus, [o if isinstance(o, str) else o.event_id for o in first])  # type: ignore[union-attr]


def test_a_call_cancelled_while_connecting_its_batch_leaves_the_others_to_be_sent(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)
        client.script_load(PUBLISH_LUA)  # so that no publish needs a second connection to load it

        async def main() -> list[object]:
            try:
                await bus.publish("load.item.made", {"n": -1})  # one connection, kept at hand
                calls = [asyncio.ensure_future(bus.publish("load.item.made", {"n": n})) for n in range(50)]
                # One turn: the first call takes the connection at hand; the call that queues
                # the EARLY_SEND_EVENTS-th needs a new one and waits for it to connect.
                await asyncio.sleep(0)
                calls[EARLY_SEND_EVENTS].cancel()
                return list(await asyncio.gather(*calls, return_exceptions=True))
            finally:
                await bus.aclose()

        outcomes = asyncio.run(main())
        assert isinstance(outcomes[EARLY_SEND_EVENTS], asyncio.CancelledError)
        ids = [o for i, o in enumerate(outcomes) if i != EARLY_SEND_EVENTS]
        assert all(isinstance(o, str) for o in ids), ids  # none failed for the cancelled caller
        assert client.xlen(bus.keys.stream) == 50  # the first and the 49 not cancelled
        _stored_once(client, bus, ids)  # type: ignore[arg-type]


@pytest.mark.parametrize("calls", [1 + EARLY_SEND_EVENTS, 100])
def test_aclose_waits_for_the_publishes_under_way(tmp_path: Path, calls: int) -> None:
    """With 1 + EARLY_SEND_EVENTS calls, what is under way when aclose starts is only a call
    alone and a batch whose caller is still connecting: no task of the coalescer's own."""
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> tuple[list[object], list[bool]]:
            await bus.publish("load.item.made", {"n": -1})
            pool = bus._coalescer().client.connection_pool
            futures = [asyncio.ensure_future(bus.publish("load.item.made", {"n": n})) for n in range(calls)]
            await asyncio.sleep(0)  # every call queued or written; none answered yet
            await bus.aclose()
            # Nothing went on using the client after it was closed: every connection is closed.
            left = [c.is_connected for c in (*pool._available_connections, *pool._in_use_connections)]
            return list(await asyncio.gather(*futures, return_exceptions=True)), left

        outcomes, left_connected = asyncio.run(main())
        assert not any(left_connected), left_connected
        assert all(isinstance(o, str) for o in outcomes), outcomes
        assert client.xlen(bus.keys.stream) == calls + 1
        _stored_once(client, bus, outcomes)  # type: ignore[arg-type]


def test_a_cancelled_aclose_cancels_no_publish(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus(url)
        client = redis.Redis.from_url(url)

        async def main() -> list[object]:
            await bus.publish("load.item.made", {"n": -1})
            futures = [asyncio.ensure_future(bus.publish("load.item.made", {"n": n})) for n in range(100)]
            await asyncio.sleep(0)  # every call queued or written; none answered yet
            closing = asyncio.ensure_future(bus.aclose())
            await asyncio.sleep(0)  # aclose is waiting for them
            closing.cancel()
            outcomes = list(await asyncio.gather(*futures, return_exceptions=True))
            await bus.aclose()
            return outcomes

        outcomes = asyncio.run(main())
        assert all(isinstance(o, str) for o in outcomes), outcomes
        assert client.xlen(bus.keys.stream) == 101
        _stored_once(client, bus, outcomes)  # type: ignore[arg-type]


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


def test_a_batch_redis_stalls_under_fails_every_call_with_an_unknown_outcome(tmp_path: Path) -> None:
    # Redis stopped (SIGSTOP: a host stalled, a process swapped out) under large events: the
    # round trip outlasts the client's socket timeout. Here the kernel's socket buffers take
    # the writes and the read times out; a write that waits on a full buffer is turned into
    # the same redis-py error by coalesce._as_redis_error.
    with redis_server(tmp_path) as url:
        settings = Settings(
            redis_url=f"{url}?socket_timeout=1",
            events_prefix=f"co{uuid.uuid4().hex[:8]}",
            event_contract_modules=[],
            events_max_data_bytes=1_000_000,
        )
        bus = EventBus(settings)
        client = redis.Redis.from_url(url)
        pid = int(client.info("server")["process_id"])
        blob = "x" * 900_000
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        left_open: list[int] = []

        async def main() -> list[object]:
            try:
                await bus.publish("load.item.made", {"n": 0})  # connected, the script loaded
                os.kill(pid, signal.SIGSTOP)
                try:
                    calls = (bus.publish("load.item.made", {"blob": blob, "n": n}) for n in range(64))
                    return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60))
                finally:
                    os.kill(pid, signal.SIGCONT)
            finally:
                await bus.aclose()
                left_open.append(_sockets_to(port))

        before = _sockets_to(port)  # this test's own client's
        outcomes = asyncio.run(main())
        assert outcomes and all(isinstance(o, PublishOutcomeUnknown) for o in outcomes), {
            type(o).__name__ for o in outcomes
        }
        # A connection dropped mid-batch was closed at once, not left open writing out the
        # rest of its batch (to a Redis that reads again) until the loop closed.
        assert left_open == [before]


def _sockets_to(port: int) -> int:
    """How many sockets of this process are connected to ``port`` on this host (Linux's /proc)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    inodes = {row[9] for row in rows if int(row[2].rsplit(":", 1)[1], 16) == port and row[3] == "01"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        count += target.startswith("socket:[") and target[8:-1] in inodes
    return count


def test_batches_are_packed_as_redis_py_packs_them() -> None:
    import redis.asyncio.connection

    from project.coalesce import _pack

    conn = redis.asyncio.connection.Connection()  # never connected: packing only
    commands = [
        ["a" * 40, 2, "stream", "published:é", 86400, '{"data": {"name": "Zoë 🌙"}}\nevents:user.created'],
        ["b" * 40, 3, "stream", "k1", "k2", 60, "x" * 100_000],
    ]
    ours = b"".join(_pack(commands, conn))
    assert ours == b"".join(bytes(c) for c in conn.pack_commands([["EVALSHA", *c] for c in commands]))


@pytest.mark.parametrize("protocol", [2, 3])
def test_connections_are_kept_at_hand_unless_they_take_pushes(tmp_path: Path, protocol: int) -> None:
    import redis.asyncio as aredis

    from project.bus import _PUBLISH_SHA

    with redis_server(tmp_path) as url:
        redis.Redis.from_url(url).script_load(PUBLISH_LUA)

        async def main() -> tuple[int, int]:
            client = aredis.Redis.from_url(url, protocol=protocol)
            coalescer = Coalescer(client, PUBLISH_LUA, "co:stream", 60)
            assert coalescer.sha == _PUBLISH_SHA
            try:
                for n in range(3):
                    await coalescer.publish((f"co:pub:{n}", json.dumps({"n": n}), "co:channel"))
                return len(coalescer._at_hand), len(client.connection_pool._in_use_connections)
            finally:
                await client.aclose()

        at_hand, in_use = asyncio.run(main())
        # RESP2: one connection, kept at hand across the calls. RESP3: its idle connections
        # take pushes (client tracking, maintenance notifications), so each goes back.
        assert (at_hand, in_use) == ((1, 1) if protocol == 2 else (0, 0))
