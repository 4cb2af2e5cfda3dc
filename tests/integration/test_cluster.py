"""Events on a private 3-master Redis Cluster, Celery's queues on RabbitMQ.

What only cluster mode has: a stream per scope under its hash tag, routers and log writers
that find scopes as they appear and share them, dispatch in stream order within a scope, and
the refusal of a cluster with Celery's queues in Redis. The promises every broker keeps run
on the cluster too, in the modules marked ``brokers(*WITH_CLUSTER)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import uuid
from collections import Counter

import pytest
import redis

from project.errors import ConfigurationError
from project.registry import Registry
from project.router import Router
from project.settings import Settings
from tests.conftest import wait_for
from tests.integration.conftest import Stack
from tests.redis_cluster import RedisCluster3

pytestmark = pytest.mark.brokers("cluster")

APP = "tests.integration.app"


def _slot(client: redis.cluster.RedisCluster, key: str) -> int:
    return int(client.keyslot(key))


def test_each_scope_has_its_own_stream_and_its_keys_share_its_slot(stack: Stack) -> None:
    stack.start_worker()
    stack.start_router()
    bus = stack.bus()
    storm = bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
    user = bus.publish_sync("user.birth_data.updated", user_id="u1")
    stack.wait_runs(4)  # on_storm, on_any_detection, on_anything_cosmic, on_birth_data
    stack.settle()

    client, keys = stack.redis, bus.keys
    assert keys.cluster
    cosmic, users = keys.of_scope("cosmic"), keys.of_scope("user")
    assert cosmic.stream == f"{{{stack.prefix}:cosmic}}:stream"
    for scoped, event_id in ((cosmic, storm), (users, user)):
        ids = [json.loads(f[b"e"])["event_id"] for _, f in client.xrange(scoped.stream)]
        assert ids == [event_id]  # each event in its own scope's stream, and only there
        slot = _slot(client, scoped.stream)
        for key in (scoped.log_buffer, scoped.dead_letter, scoped.published(event_id), scoped.delivery("x")):
            assert _slot(client, key) == slot
    assert not client.exists(f"{stack.prefix}:stream")  # no single stream on a cluster
    rows = stack.wait_query("SELECT event_id::text FROM events_log", until=lambda r: len(r) == 2)
    assert {r.event_id for r in rows} == {storm, user}
    delivered = stack.wait_query(
        "SELECT handler FROM event_deliveries WHERE status = 'succeeded'", until=lambda r: len(r) == 4
    )
    assert {r.handler.rsplit(".", 1)[1] for r in delivered} == {
        "on_storm",
        "on_any_detection",
        "on_anything_cosmic",
        "on_birth_data",
    }


def test_a_scope_no_subscription_names_is_found_and_its_events_recorded(stack: Stack) -> None:
    stack.start_router()
    router_log = lambda: stack.log("router")  # noqa: E731
    bus = stack.bus()
    # No subscription names the scope 'orphan': the router finds its stream by looking.
    event_id = bus.publish_sync("orphan.thing.happened", {"n": 1})
    rows = stack.wait_query("SELECT event_id::text, event_type FROM events_log", until=lambda r: len(r) == 1)
    assert (rows[0].event_id, rows[0].event_type) == (event_id, "orphan.thing.happened")
    assert "serving scope 'orphan'" in router_log()
    stack.settle()


def test_within_a_scope_tasks_are_dispatched_in_stream_order(stack: Stack) -> None:
    # One worker process: RabbitMQ hands the queue's tasks over in the order they were sent.
    stack.start_router()
    bus = stack.bus()
    sent = [bus.publish_sync("user.birth_data.updated", {"n": n}, user_id=f"u{n}") for n in range(40)]
    bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 5})  # another scope meanwhile
    stack.settle()
    stack.start_worker(queues="alpha", concurrency=1)
    wait_for(lambda: stack.redis.llen(f"{stack.prefix}:test:seen:on_birth_data") == 40, what="40 runs")
    seen = [json.loads(e)["event_id"] for e in stack.redis.lrange(f"{stack.prefix}:test:seen:on_birth_data", 0, -1)]
    assert seen == sent


def test_two_routers_share_the_scopes_and_one_killed_loses_and_doubles_nothing(stack: Stack) -> None:
    stack.start_worker(concurrency=2)
    first = stack.start_router("router-1", ROUTER_BATCH_SIZE="10")
    second = stack.start_router("router-2", "--no-log-writer", ROUTER_BATCH_SIZE="10")
    bus = stack.bus()
    ids: list[str] = []
    types = ("cosmic.solar_storm.detected", "user.birth_data.updated", "bulk.item.made")

    def publish() -> None:
        for i in range(150):
            ids.append(bus.publish_sync(types[i % 3], {"i": i}, user_id=f"u{i}"))

    publisher = threading.Thread(target=publish)
    publisher.start()
    wait_for(lambda: len(ids) > 50, what="a third of the events published")
    os.kill(first.pid, signal.SIGKILL)  # its pending entries are taken over by router-2
    publisher.join()
    stack.start_router("router-3")  # a log writer again (router-1 carried the only one)

    # Each event of scope cosmic has 3 handlers, user 1, bulk 2 (on_bulk, on_bulk_item).
    expected = sum({0: 3, 1: 1, 2: 2}[i % 3] for i in range(150))
    runs = stack.wait_runs(expected, timeout_s=120)
    assert Counter(runs.values()) == Counter({1: expected}), "a handler ran twice"
    assert len(runs) == expected
    rows = stack.wait_query("SELECT count(*) AS n FROM events_log", until=lambda r: r[0].n == 150, timeout_s=60)
    assert rows[0].n == 150
    stack.settle()
    # Every router read every scope: the killed one and the one that took over from it.
    client, keys = stack.redis, bus.keys
    names = {f"{os.uname().nodename}-{proc.pid}" for proc in (first, second)}
    for scope in ("cosmic", "user", "bulk"):
        consumers = {_text(c["name"]) for c in client.xinfo_consumers(keys.of_scope(scope).stream, "router")}
        assert names <= consumers, f"scope {scope} was read by {consumers}"


def test_a_cluster_with_celery_queues_in_redis_is_refused(cluster_session: RedisCluster3) -> None:
    settings = Settings(redis_url=cluster_session.url, events_prefix="refused")
    with pytest.raises(ConfigurationError, match="CELERY_BROKER_URL to an AMQP URL"):
        Router(settings, Registry())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_a_scopes_router_reads_the_clock_of_the_master_that_holds_its_stream(stack: Stack) -> None:
    # Entry ids carry the time of the master that wrote them; the router's look at an
    # entry's age must use that master's clock, not a node picked at random.
    # A scope whose stream is not on the client's default node, where a command without a
    # key may go.
    client: redis.cluster.RedisCluster = stack.redis  # type: ignore[assignment]
    keys = stack.bus().keys
    scope = next(
        f"clock{i}" for i in range(100)
        if client.get_node_from_key(keys.of_scope(f"clock{i}").stream).name != client.get_default_node().name
    )  # fmt: skip
    router = Router(stack.settings, Registry(), client=client, scope=scope)
    try:
        master = client.get_node_from_key(router.keys.stream)

        def calls() -> dict[str, int]:
            return {
                node.name: int(client.info("commandstats", target_nodes=node).get("cmdstat_time", {}).get("calls", 0))
                for node in client.get_primaries()
            }

        before = calls()
        for _ in range(5):
            router._clock_due = 0.0  # due again: as once a minute
            router._server_ms()
        after = calls()
        assert after[master.name] - before[master.name] == 5
        assert {name: after[name] - before[name] for name in after if name != master.name} == dict.fromkeys(
            (name for name in after if name != master.name), 0
        )
    finally:
        if router.sender is not None:
            router.sender.close()


def test_concurrent_await_publishes_on_a_cluster_are_stored_once_each_in_their_scope(stack: Stack) -> None:
    # Each round is a fresh event loop, so a fresh asyncio cluster client whose first commands
    # come in a burst: now and then redis-py learnt the topology twice then, and closed
    # connections other publishes were opening (about one round in fifty failed that way).
    bus = stack.bus()
    scopes = ("cosmic.solar_storm.detected", "user.birth_data.updated", "module.profile.calculated")
    published: list[tuple[str, str]] = []

    async def publish_all(calls: list[tuple[str, str]]) -> list[str]:
        try:
            return list(await asyncio.gather(*(bus.publish(t, {"n": 1}, event_id=i) for t, i in calls)))
        finally:
            await bus.aclose()

    for _ in range(60):
        calls = [(scopes[n % 3], str(uuid.uuid4())) for n in range(90)]
        assert asyncio.run(publish_all(calls)) == [i for _, i in calls]
        published += calls
    assert asyncio.run(publish_all(calls)) == [i for _, i in calls]  # the last round again: stored once
    client = stack.redis
    for event_type in scopes:
        stream = bus.keys.scoped(event_type).stream
        stored = [json.loads(f[b"e"])["event_id"] for _, f in client.xrange(stream)]
        # once each; concurrent calls have no order among them (their batches share no connection)
        assert sorted(stored) == sorted(i for t, i in published if t == event_type)
