"""The router at Redis' limits: wrong key types, huge batches, repeated entries, trimming, a full log buffer."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from project.consumer import ensure_group
from project.keys import PUBLISHED_FIELD, ROUTER_GROUP, Keys
from project.records import BufferLengths
from project.registry import Registry, Subscription
from project.router import Router
from project.settings import Settings
from tests.conftest import wait_for
from tests.integration.conftest import PG_DSN, Stack, _pg_admin


def _envelope(event_type: str = "bulk.item.made", **overrides: object) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "user_id": 42,
        "data": {"item_id": 1},
        "timestamp": "2026-01-01T00:00:00+00:00",
        "module": "shop",
        "causation_id": None,
        "correlation_id": None,
        "hops": 0,
    }
    envelope.update(overrides)
    return envelope


def _add(client: redis.Redis, keys: Keys, envelope: dict[str, Any]) -> str:
    """Append ``envelope`` to the stream as publish would, without the bus; return the entry id."""
    return str(client.xadd(keys.stream, {"e": json.dumps(envelope)}).decode())


def _task_ids(client: redis.Redis, keys: Keys, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(keys.celery_queue(queue), 0, -1)]


def _pending(client: redis.Redis, keys: Keys) -> int:
    return int(client.xpending(keys.stream, ROUTER_GROUP)["pending"])


def test_a_celery_queue_key_of_the_wrong_type_dead_letters_only_the_entries_sent_there(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    client.set(keys.celery_queue("gamma"), "x")  # bulk.item.made goes to beta and gamma
    bulk = [_envelope("bulk.item.made") for _ in range(3)]
    birth = [_envelope("user.birth_data.updated") for _ in range(3)]
    entries = {}
    for b, u in zip(bulk, birth, strict=True):
        entries[_add(client, keys, b)] = b
        _add(client, keys, u)
    stack.start_router()

    wait_for(lambda: stack.queue_length("alpha") == 3, what="the events for alpha")
    wait_for(lambda: client.xlen(keys.dead_letter) == 3, what="three dead letters")
    wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
    assert stack.queue_length("beta") == 0  # nothing half-sent: beta's copy was never pushed
    for _, fields in client.xrange(keys.dead_letter):
        assert fields[b"id"].decode() in entries
        assert fields[b"reason"].decode() == f"Celery queue key {keys.celery_queue('gamma')} holds a string, not a list"
        raw = json.loads(json.loads(fields[b"raw"])["e"])
        assert raw == entries[fields[b"id"].decode()]
    assert "not lists" in stack.log("router")

    client.delete(keys.celery_queue("gamma"))  # fixed: later entries go through
    _add(client, keys, _envelope("bulk.item.made"))
    wait_for(lambda: stack.queue_length("gamma") == 1 and stack.queue_length("beta") == 1, what="a later event")
    assert stack.procs["router"].poll() is None


def test_an_entrys_only_queue_key_of_the_wrong_type_is_found_by_its_push_and_nothing_is_half_sent(
    stack: Stack,
) -> None:
    # user.birth_data.updated goes to alpha only: no TYPE is asked first, the push itself is
    # refused and leaves nothing behind.
    client, keys = stack.redis, stack.bus().keys
    client.set(keys.celery_queue("alpha"), "x")
    bulk = [_envelope("bulk.item.made") for _ in range(2)]
    birth = {_add(client, keys, _envelope("user.birth_data.updated")): None for _ in range(2)}
    for env in bulk:
        _add(client, keys, env)
    stack.start_router()

    wait_for(lambda: client.xlen(keys.dead_letter) == 2, what="two dead letters")
    wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
    assert {f[b"id"].decode() for _, f in client.xrange(keys.dead_letter)} == set(birth)
    reason = f"Celery queue key {keys.celery_queue('alpha')} holds a string, not a list"
    assert {f[b"reason"].decode() for _, f in client.xrange(keys.dead_letter)} == {reason}
    assert client.get(keys.celery_queue("alpha")) == b"x"  # untouched
    assert stack.queue_length("beta") == 2 and stack.queue_length("gamma") == 2
    stack.settle()
    logged = stack.query("SELECT event_id::text FROM events_log")
    assert sorted(r.event_id for r in logged) == sorted(env["event_id"] for env in bulk)


def test_a_dead_letter_key_of_the_wrong_type_holds_back_only_what_must_be_dead_lettered(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    client.set(keys.dead_letter, "in the way")
    good = [_envelope("user.birth_data.updated") for _ in range(3)]
    for env in good:
        _add(client, keys, env)
    broken = str(client.xadd(keys.stream, {"e": "{not json"}).decode())
    stack.start_router()

    # The entries before the broken one are sent once; the broken one waits, never dropped.
    wait_for(lambda: stack.queue_length("alpha") == 3, what="the good events sent")
    wait_for(lambda: "EVENTBUS-KEYTYPE" in stack.log("router"), what="the refusal logged")
    assert _pending(client, keys) == 1
    assert client.get(keys.dead_letter) == b"in the way"

    client.delete(keys.dead_letter)  # fixed: the broken entry is dead-lettered, nothing sent again
    wait_for(lambda: client.xlen(keys.dead_letter) == 1, what="the broken entry dead-lettered")
    wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
    [(_, letter)] = client.xrange(keys.dead_letter)
    assert letter[b"id"].decode() == broken
    ids = _task_ids(client, keys, "alpha")
    assert len(ids) == 3 and len(set(ids)) == 3
    assert stack.procs["router"].poll() is None


def _calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran ``command`` (scripts' commands included), server-wide."""
    stats: Any = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _bulk_router(stack: Stack, consumer: str) -> Router:
    """An in-process router of bulk.item.made to beta and gamma (its dispatch called at known moments)."""
    registry = Registry()
    for name, queue in (("t.on_bulk", "beta"), ("t.on_bulk_item", "gamma")):
        registry.add(Subscription(name, ("bulk.item.made",), print, queue, None, 0, 1.0, 1.0))
    return Router(stack.settings, registry, consumer=consumer, client=stack.redis)


@pytest.mark.parametrize("length_read", [True, False], ids=["length-read", "length-known"])
def test_a_log_buffer_of_the_wrong_type_holds_the_entries_back_and_sends_nothing_twice(
    stack: Stack, length_read: bool
) -> None:
    # The router reads the log buffer's length (XLEN, which finds its type) only near the
    # bound or once a second. Between reads, the record's own XADD finds the wrong type after
    # the entry's tasks were pushed: they are popped back, and nothing is half sent.
    client, keys = stack.redis, stack.bus().keys
    ensure_group(client, keys.stream, ROUTER_GROUP)
    router = _bulk_router(stack, "c1")
    if not length_read:
        router.buffer_lengths = BufferLengths(every_s=3600)
    _add(client, keys, _envelope("bulk.item.made"))
    router.dispatch(client.xreadgroup(ROUTER_GROUP, "c1", {keys.stream: ">"})[0][1])
    assert stack.queue_length("beta") == stack.queue_length("gamma") == 1
    if length_read:
        router.buffer_lengths = BufferLengths(every_s=0)  # read again before the next write

    client.delete(keys.log_buffer)
    client.set(keys.log_buffer, "in the way")
    held = [_add(client, keys, _envelope("bulk.item.made")) for _ in range(3)]
    entries = client.xreadgroup(ROUTER_GROUP, "c1", {keys.stream: ">"})[0][1]
    lpops = _calls(client, "lpop")
    with pytest.raises(redis.ResponseError, match=f"EVENTBUS-KEYTYPE {keys.log_buffer} holds a string"):
        router.dispatch(entries)
    # Refused by XLEN before any push, or pushed to beta and gamma and popped back.
    assert _calls(client, "lpop") - lpops == (0 if length_read else 2)
    assert stack.queue_length("beta") == stack.queue_length("gamma") == 1  # none of the three pushed
    assert _pending(client, keys) == 3
    assert client.get(keys.log_buffer) == b"in the way"

    client.delete(keys.log_buffer)  # fixed: each held entry is sent, once
    router.dispatch(entries)
    assert _pending(client, keys) == 0
    for queue in ("beta", "gamma"):
        ids = _task_ids(client, keys, queue)
        assert len(ids) == 4 and len(set(ids)) == 4
    assert [json.loads(f[b"r"])[0] for _, f in client.xrange(keys.log_buffer)] == ["e"] * len(held)


def test_an_entry_redis_keeps_refusing_is_dead_lettered_alone_and_the_others_are_sent_once(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    before = [_envelope("user.birth_data.updated") for _ in range(5)]
    poison = _envelope("user.birth_data.updated")
    after = [_envelope("user.birth_data.updated") for _ in range(5)]
    # Its dedup key holds a hash: the script's GET fails with WRONGTYPE on every try.
    client.hset(keys.published(poison["event_id"]), "x", "1")
    for env in before:
        _add(client, keys, env)
    poison_entry = _add(client, keys, poison)
    for env in after:
        _add(client, keys, env)
    stack.start_router()

    wait_for(lambda: client.xlen(keys.dead_letter) == 1, what="the poison entry dead-lettered")
    wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
    ids = _task_ids(client, keys, "alpha")
    assert len(ids) == 10 and len(set(ids)) == 10  # before and after, each sent exactly once
    [(_, letter)] = client.xrange(keys.dead_letter)
    assert letter[b"id"].decode() == poison_entry
    assert "WRONGTYPE" in letter[b"reason"].decode()
    assert "one at a time" in stack.log("router")

    later = _envelope("user.birth_data.updated")
    _add(client, keys, later)
    wait_for(lambda: stack.queue_length("alpha") == 11, what="a later event")
    assert stack.procs["router"].poll() is None


def test_the_same_event_added_twice_to_the_stream_is_dispatched_once(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    env = _envelope("bulk.item.made")  # two handlers: on_bulk (beta), on_bulk_item (gamma)
    first = _add(client, keys, env)
    _add(client, keys, env)
    stack.start_router()
    wait_for(lambda: stack.queue_length("beta") == 1, what="the event dispatched")
    wait_for(lambda: _pending(client, keys) == 0, what="both entries acknowledged")
    wait_for(lambda: "repeat an event already published" in stack.log("router"), what="the duplicate noticed")
    assert stack.queue_length("beta") == 1
    assert stack.queue_length("gamma") == 1
    assert client.get(keys.published(env["event_id"])) == first.encode()
    assert 0 < client.ttl(keys.published(env["event_id"])) <= stack.settings.events_dedup_window_s

    _add(client, keys, env)  # and again, after it was dispatched
    other = _envelope("bulk.item.made")
    _add(client, keys, other)
    wait_for(lambda: stack.queue_length("beta") == 2, what="the next event")
    wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
    assert stack.queue_length("gamma") == 2
    stack.settle()
    logged = stack.query("SELECT event_id::text FROM events_log")
    assert sorted(r.event_id for r in logged) == sorted([env["event_id"], other["event_id"]])


def test_a_published_entry_is_sent_without_its_dedup_key_and_a_copy_added_by_hand_is_not(stack: Stack) -> None:
    # The publish script keeps an event_id to one entry and marks it (PUBLISHED_FIELD), so the
    # router does not look at the dedup key for it: here the key says another entry, and the
    # published one is still sent. A copy added by anything else is compared with the key.
    client, keys = stack.redis, stack.bus().keys
    event_id = stack.bus().publish_sync("bulk.item.made", {"item_id": 1}, user_id=42)
    [(published, fields)] = client.xrange(keys.stream)
    assert fields[PUBLISHED_FIELD.encode()] == b"1"
    assert client.get(keys.published(event_id)) == published  # the script's own record of it
    client.set(keys.published(event_id), "0-1", keepttl=True)  # as if another entry had been it
    _add(client, keys, json.loads(fields[b"e"]))  # the same event, added by hand
    stack.start_router()
    wait_for(lambda: "repeat an event already published" in stack.log("router"), what="the copy noticed")
    assert _pending(client, keys) == 0  # both entries handled in one call
    # Had the router looked at the key for the published entry too, neither would have been sent.
    assert stack.queue_length("beta") == 1 and stack.queue_length("gamma") == 1


def test_a_published_entry_read_after_its_dedup_key_lapsed_defers_to_the_entry_the_key_names(stack: Stack) -> None:
    # A router lagging past the dedup window: the event's key lapsed, a retried publish
    # stored it again (a second marked entry) and the key names that one. The old entry is
    # compared with the key, as any entry older than half the window is, and dropped; the
    # retried one is sent. Skipping the key for both would send every delivery twice.
    client, keys, bus = stack.redis, stack.bus().keys, stack.bus()
    envelope = _envelope()
    lapsed_ms = int(time.time() * 1000) - stack.settings.events_dedup_window_s * 1000 - 60_000
    old = client.xadd(keys.stream, {"e": json.dumps(envelope), PUBLISHED_FIELD: "1"}, id=f"{lapsed_ms}-0")
    assert not client.exists(keys.published(envelope["event_id"]))  # lapsed
    bus.publish_sync("bulk.item.made", {"item_id": 1}, user_id=42, event_id=envelope["event_id"])
    [(_, _), (retried, _)] = client.xrange(keys.stream)
    assert client.get(keys.published(envelope["event_id"])) == retried != old
    stack.start_router()
    wait_for(lambda: "repeat an event already published" in stack.log("router"), what="the old entry noticed")
    wait_for(lambda: _pending(client, keys) == 0 and client.xinfo_groups(keys.stream)[0]["lag"] == 0, what="both read")
    assert stack.queue_length("beta") == 1 and stack.queue_length("gamma") == 1


def test_entry_age_is_read_on_the_redis_clock_even_from_a_router_host_whose_clock_is_behind(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import project.router as router_module

    router = Router(stack.settings, Registry(), client=stack.redis)
    seconds, micros = stack.redis.time()
    now_ms, window_s = seconds * 1000 + micros // 1000, stack.settings.events_dedup_window_s
    fresh, old = f"{now_ms - 1000}-0", f"{now_ms - int(0.6 * window_s * 1000)}-3".encode()
    assert router._unique(fresh) and not router._unique(old)
    real_time = time.time
    # This host's clock two windows behind Redis': the offset from TIME makes up for it.
    monkeypatch.setattr(router_module, "time", types.SimpleNamespace(time=lambda: real_time() - 2 * window_s))
    router._clock_due = 0.0
    assert router._unique(fresh) and not router._unique(old)
    # Without it, the old entry would pass for a fresh one and skip its dedup key.
    router._clock_offset_ms, router._clock_due = 0.0, float("inf")
    assert router._unique(old)
    assert not router._unique("not-an-id")


# -- a batch over Redis' query buffer limit ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A private Redis that disconnects a client using over 2 MB (the shared one is never reconfigured)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory-clients", "2mb"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), what="the private redis-server")
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _registry(*queues: str) -> Registry:
    registry = Registry()
    for q in queues:
        registry.add(Subscription(name=f"tests.limits.on_{q}", patterns=("bulk.#",), handler=lambda e: None, queue=q,
                                  module=None, max_retries=0, backoff_s=1.0, backoff_max_s=1.0))  # fmt: skip
    return registry


def test_a_batch_larger_than_a_redis_client_may_use_is_split(small_redis: redis.Redis) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{small_redis.connection_pool.connection_kwargs['port']}/0",
        events_prefix="big",
        router_batch_size=200,
        router_batch_max_bytes=256 * 1024,
        router_block_ms=50,
    )
    keys = Keys(settings.events_prefix)
    # ~5 KB of data sent to two queues: ~19 KB of script arguments per entry with its record
    # and two messages, ~3.8 MB for a batch of 200 in one call: Redis would evict the router's
    # connection for it (maxmemory-clients), again and again.
    blob = "x" * 5_000
    ids = [_add(small_redis, keys, _envelope("bulk.item.made", data={"blob": blob, "i": i})) for i in range(200)]
    router = Router(settings, _registry("alpha", "beta"), consumer="big", client=small_redis)
    stop = threading.Event()
    thread = threading.Thread(target=router.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: router.stats.entries == len(ids), timeout_s=60, what="every entry dispatched")
    finally:
        stop.set()
        thread.join(timeout=20)
    assert small_redis.llen(keys.celery_queue("alpha")) == 200
    assert small_redis.llen(keys.celery_queue("beta")) == 200
    assert small_redis.xlen(keys.log_buffer) == 200
    assert router.stats.errors == 0
    assert int(small_redis.info("stats")["evicted_clients"]) == 0


# -- trimming ----------------------------------------------------------------------------------


def test_routers_trim_only_what_every_group_no_longer_needs(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    stack.start_router(ROUTER_TRIM_INTERVAL_S="0.1")
    for _ in range(20):
        _add(client, keys, _envelope())
    wait_for(lambda: stack.queue_length("beta") == 20, what="20 events dispatched")
    wait_for(lambda: client.xlen(keys.stream) == 0, what="the dispatched entries trimmed")

    # Another group, made by someone else, reading from here on: its unread entries stay.
    client.xgroup_create(keys.stream, "audit", id="$")
    added = [_add(client, keys, _envelope()) for _ in range(30)]
    wait_for(lambda: stack.queue_length("beta") == 50, what="30 more dispatched")
    client.xreadgroup("audit", "a1", {keys.stream: ">"}, count=10)
    client.xack(keys.stream, "audit", *added[:10])
    wait_for(lambda: client.xlen(keys.stream) == 20, what="what audit acknowledged trimmed")
    assert [e[0].decode() for e in client.xrange(keys.stream)] == added[10:]

    # In process from here, to call trim() at known moments.
    router = Router(stack.settings, Registry(), consumer="trimmer", client=client)
    client.xreadgroup("audit", "a1", {keys.stream: ">"}, count=5)  # read, not acknowledged
    assert router.trim() == 0
    client.xack(keys.stream, "audit", *added[10:15])
    assert router.trim() == 5

    # Entries no router read are never trimmed, however many there are.
    stack.stop("router")
    unread = [_add(client, keys, _envelope()) for _ in range(300)]
    client.xreadgroup("audit", "a1", {keys.stream: ">"}, count=10_000)
    client.xack(keys.stream, "audit", *added[15:], *unread)
    assert router.trim() == 15  # up to the routers' last delivered entry, not one more
    assert [e[0].decode() for e in client.xrange(keys.stream)] == unread

    # Read by a router, not acknowledged: kept too.
    client.xreadgroup(ROUTER_GROUP, "holder", {keys.stream: ">"}, count=10)
    assert router.trim() == 0
    client.xack(keys.stream, ROUTER_GROUP, *unread[:10])
    assert router.trim() == 10
    assert client.xlen(keys.stream) == 290


def test_nothing_is_trimmed_before_the_router_group_exists(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    router = Router(stack.settings, Registry(), consumer="trimmer", client=client)
    assert router.trim() == 0  # no stream at all
    for _ in range(5):
        _add(client, keys, _envelope())
    assert router.trim() == 0  # no group at all
    client.xgroup_create(keys.stream, "audit", id="$")
    assert router.trim() == 0  # a group that needs none of them, but the routers have not read them
    assert client.xlen(keys.stream) == 5
    ensure_group(client, keys.stream, ROUTER_GROUP)
    assert router.trim() == 0  # created reading from the start: they are all still needed
    assert client.xlen(keys.stream) == 5


# -- the log buffer at its limit ---------------------------------------------------------------


def test_a_full_log_buffer_sheds_event_records_but_dispatch_goes_on(stack: Stack) -> None:
    client, keys = stack.redis, stack.bus().keys
    limit, events = 40, 150
    _pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS false")
    _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{stack.database}'")
    try:
        stack.start_router(LOG_BUFFER_MAX_RECORDS=str(limit), ROUTER_BATCH_SIZE="25")
        ids = [_add(client, keys, _envelope("bulk.item.made")) for _ in range(events)]
        wait_for(lambda: stack.queue_length("beta") == events, what="every event dispatched")
        wait_for(lambda: _pending(client, keys) == 0, what="every entry acknowledged")
        assert stack.queue_length("gamma") == events
        assert client.xlen(keys.log_buffer) == limit  # never over the bound
        assert int(client.hget(keys.log_shed, "e") or 0) == events - limit
        wait_for(lambda: "event records were not buffered" in stack.log("router"), what="the router's error")
        assert "ERROR eventbus.router: router: the log buffer" in stack.log("router")
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(PG_DSN.rsplit("/", 1)[0] + f"/{stack.database}").close()

        stack.start_worker(queues="beta,gamma")  # and the handlers run
        runs = stack.wait_runs(2 * events)
        assert len(runs) == 2 * events and set(runs.values()) == {1}
        assert len(ids) == events
    finally:
        _pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS true")
    # What was buffered reaches PostgreSQL; what was shed is counted, not silently lost.
    stack.wait_query("SELECT count(*) FROM events_log", until=lambda r: r[0][0] == limit)
    assert int(client.hget(keys.log_shed, "e") or 0) + limit == events


def test_a_full_log_buffer_sheds_delivery_records_but_the_handlers_run(stack: Stack) -> None:
    """The workers' success records stop exactly at the bound, as the router's do."""
    client, keys = stack.redis, stack.bus().keys
    # 25 event records, then 35 of the 50 success records: the buffer starts under half the
    # bound, where a worker reading its length once a second would overshoot it.
    limit, events = 60, 25
    stack.start_router("router", "--no-log-writer", LOG_BUFFER_MAX_RECORDS=str(limit))  # nothing drains it
    for _ in range(events):
        _add(client, keys, _envelope("bulk.item.made"))
    wait_for(lambda: client.xlen(keys.log_buffer) == events, what="every event record buffered")

    stack.start_worker(queues="beta,gamma", LOG_BUFFER_MAX_RECORDS=str(limit))
    runs = stack.wait_runs(2 * events)
    assert len(runs) == 2 * events and set(runs.values()) == {1}
    wait_for(lambda: int(client.hget(keys.log_shed, "d") or 0) == 2 * events - (limit - events),
             what="the records past the bound shed and counted")  # fmt: skip
    assert client.xlen(keys.log_buffer) == limit  # never over the bound
    assert client.hget(keys.log_shed, "e") is None
    records = [json.loads(fields[b"r"]) for _, fields in client.xrange(keys.log_buffer)]
    assert sum(1 for r in records if r[0] == "d" and r[4] == "succeeded") == limit - events


def test_log_buffer_bytes_per_event(stack: Stack) -> None:
    """Measure what the router's record of one event costs the log buffer (README, "Reliability")."""
    client, keys = stack.redis, stack.bus().keys
    events = 2000
    stack.start_router("router", "--no-log-writer")
    pipe = client.pipeline(transaction=False)
    for i in range(events):
        env = _envelope("bulk.item.made", user_id=100_000 + i, data={"item_id": i, "sku": f"SKU-{i:06d}"})
        pipe.xadd(keys.stream, {"e": json.dumps(env, separators=(",", ":"))})
    pipe.execute()
    wait_for(lambda: client.xlen(keys.log_buffer) == events, timeout_s=60, what="every event recorded")
    used = int(client.memory_usage(keys.log_buffer, samples=0) or 0)
    record = client.xrange(keys.log_buffer, count=1)[0][1][b"r"]
    per_event = used / events
    print(f"\nlog buffer: {per_event:.0f} bytes per event (router record, 2 handlers; record text {len(record)} B)")
    assert 100 < per_event < 800
