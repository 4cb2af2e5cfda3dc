"""publish: validated like the router decodes, idempotent per event_id, and clear about failures."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from project.bus import EventBus
from project.context import handling
from project.envelope import decode_envelope
from project.errors import InvalidEventData, PublishOutcomeUnknown, PublishRefused
from project.settings import Settings
from tests.conftest import wait_for
from tests.integration.conftest import REDIS_URL
from tests.integration.redis_server import redis_server


def _bus(prefix: str, url: str = REDIS_URL, **extra: object) -> EventBus:
    return EventBus(Settings(redis_url=url, events_prefix=prefix, **extra))  # type: ignore[arg-type]


def _entries(bus: EventBus) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in bus.sync_client().xrange(bus.keys.stream)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": "a\x00b"}, "NUL"),
        ({"module": "m\x00"}, "NUL"),
        ({"data": {"text": "nul \x00 inside"}}, "NUL"),
        ({"data": {"k\x00": 1}}, "NUL"),
        ({"module": "m" * 201}, "module"),
        ({"user_id": "u" * 201}, "user_id"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"data": {"s": "lone \ud800"}}, "surrogate"),
        ({"user_id": "\udfff"}, "user_id"),
    ],
)
def test_publish_refuses_what_the_router_or_the_log_would_refuse(
    prefix: str, kwargs: dict[str, object], field: str
) -> None:
    bus = _bus(prefix)
    data = kwargs.pop("data", {"x": 1})
    with pytest.raises(InvalidEventData, match=field):
        bus.publish_sync("user.note.added", data, **kwargs)  # type: ignore[arg-type]
    assert _entries(bus) == []


def test_everything_publish_accepts_decodes_on_the_router(prefix: str) -> None:
    bus = _bus(prefix)
    bus.publish_sync("user.note.added", {"text": "back\\u0000slash is fine", "n": [1, 2.5, None]}, user_id=2**70)
    bus.publish_sync("user.note.added", {"ü": "ẞ"}, user_id="x" * 200, module="m" * 200)
    for fields in _entries(bus):
        decode_envelope(fields[b"e"], bus.settings.events_max_data_bytes)


def test_publishing_the_same_event_id_again_stores_it_once(prefix: str) -> None:
    bus = _bus(prefix)
    chosen = str(uuid.uuid4())
    assert bus.publish_sync("user.created", {"a": 1}, event_id=chosen) == chosen
    assert bus.publish_sync("user.created", {"a": 1}, event_id=uuid.UUID(chosen)) == chosen

    async def again() -> str:
        try:
            return await bus.publish("user.created", {"a": 1}, event_id=chosen.upper())
        finally:
            await bus.aclose()

    assert asyncio.run(again()) == chosen
    client = bus.sync_client()
    [(entry_id, _)] = client.xrange(bus.keys.stream)
    assert client.get(bus.keys.published(chosen)) == entry_id  # the router compares the two
    assert client.ttl(bus.keys.published(chosen)) > 0
    assert bus.publish_sync("user.created", {"a": 2}) != chosen
    assert client.xlen(bus.keys.stream) == 2  # the duplicates grew the stream by nothing


def test_the_same_event_id_twice_in_one_batch_is_stored_once(prefix: str) -> None:
    bus = _bus(prefix)
    chosen = str(uuid.uuid4())

    async def main() -> list[str]:
        try:
            calls = [bus.publish("load.item.made", {"n": n}) for n in range(10)]
            calls.insert(3, bus.publish("load.item.made", {"n": -1}, event_id=chosen))
            calls.append(bus.publish("load.item.made", {"n": -1}, event_id=chosen))
            return list(await asyncio.gather(*calls))
        finally:
            await bus.aclose()

    ids = asyncio.run(main())
    assert ids.count(chosen) == 2
    client = bus.sync_client()
    entries = client.xrange(bus.keys.stream)
    assert len(entries) == 11
    [entry_id] = [i for i, f in entries if decode_envelope(f[b"e"], 1 << 20).event_id == chosen]
    assert client.get(bus.keys.published(chosen)) == entry_id


def test_a_dedup_key_or_stream_of_another_type_refuses_the_publish_and_stores_nothing(prefix: str) -> None:
    bus = _bus(prefix)
    client = bus.sync_client()
    first = bus.publish_sync("user.created", {"a": 1})
    bad = str(uuid.uuid4())
    client.hset(bus.keys.published(bad), "x", "1")
    with pytest.raises(PublishRefused, match="WRONGTYPE"):
        bus.publish_sync("user.created", {"a": 2}, event_id=bad)
    assert [decode_envelope(f[b"e"], 1 << 20).event_id for f in _entries(bus)] == [first]
    assert client.hgetall(bus.keys.published(bad)) == {b"x": b"1"}

    client.delete(bus.keys.stream)
    client.set(bus.keys.stream, "not a stream")
    refused = str(uuid.uuid4())
    with pytest.raises(PublishRefused, match="WRONGTYPE"):
        bus.publish_sync("user.created", {"a": 3}, event_id=refused)
    assert not client.exists(bus.keys.published(refused))  # no dedup key for what was not stored
    assert client.get(bus.keys.stream) == b"not a stream"


def test_publish_runs_three_commands_and_a_duplicate_is_undone_inside_the_script(tmp_path: Path) -> None:
    """XADD, SET NX, PUBLISH per event. A duplicate's XADD is taken back before any reader
    (even a router blocked in XREADGROUP) can see its entry, and leaves the group's lag right."""
    with redis_server(tmp_path) as url:
        bus = _bus("commands", url=url)
        admin = redis.Redis.from_url(url)
        bus.publish_sync("user.created", {"a": 0})  # connected, script loaded
        admin.xgroup_create(bus.keys.stream, "g", "$")

        def calls() -> dict[str, int]:
            stats = admin.info("commandstats")
            names = ("get", "xadd", "set", "publish", "xinfo|stream", "xdel", "xsetid")
            return {c: stats[f"cmdstat_{c}"]["calls"] for c in names if f"cmdstat_{c}" in stats}

        admin.config_resetstat()
        event_id = bus.publish_sync("user.created", {"a": 1})
        assert calls() == {"xadd": 1, "set": 1, "publish": 1}
        [[_, [(entry_id, _)]]] = admin.xreadgroup("g", "c", {bus.keys.stream: ">"})

        read: list[Any] = []

        def router() -> None:
            with redis.Redis.from_url(url) as client:
                read.append(client.xreadgroup("g", "c", {bus.keys.stream: ">"}, block=10_000))

        blocked = threading.Thread(target=router)
        blocked.start()
        wait_for(lambda: admin.info("clients")["blocked_clients"] == 1, what="a reader blocked in XREADGROUP")
        admin.config_resetstat()
        assert bus.publish_sync("user.created", {"a": 1}, event_id=event_id) == event_id
        assert calls() == {"xadd": 1, "set": 1, "xinfo|stream": 1, "xdel": 1, "xsetid": 1, "get": 1}
        assert admin.xlen(bus.keys.stream) == 2
        assert admin.get(bus.keys.published(event_id)) == entry_id

        later = bus.publish_sync("user.created", {"a": 2})
        blocked.join(timeout=15)
        assert not blocked.is_alive()
        # Redis 7.0 wakes the blocked reader at the duplicate, with no entry; later ones serve it later.
        read.append(admin.xreadgroup("g", "c", {bus.keys.stream: ">"}))
        seen = [fields for reply in read for _, entries in reply or [] for _, fields in entries]
        assert [decode_envelope(f[b"e"], 1 << 20).event_id for f in seen] == [later]
        assert admin.xpending(bus.keys.stream, "g")["pending"] == 2
        [group] = admin.xinfo_groups(bus.keys.stream)
        assert group["lag"] == 0  # not 1, for the duplicate's entry (redis/redis#13337)
        bus.publish_sync("user.created", {"a": 3})
        assert admin.xinfo_groups(bus.keys.stream)[0]["lag"] == 1


def test_events_published_by_a_handler_that_runs_again_keep_their_ids(prefix: str) -> None:
    bus = _bus(prefix)
    cause = {"event_id": str(uuid.uuid4()), "hops": 0}
    first, second = [], []
    for ids in (first, second):
        with handling(cause, "m", delivery_id="task-1"):
            ids.append(bus.publish_sync("a.b", {"n": 1}))
            ids.append(bus.publish_sync("a.c", {"n": 2}))
    assert first == second and first[0] != first[1]
    assert len(_entries(bus)) == 2


def test_publish_with_the_connection_gone_says_the_outcome_is_unknown_and_can_be_retried(prefix: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = _bus(prefix, url=f"redis://127.0.0.1:{port}/0")
    with pytest.raises(PublishOutcomeUnknown) as caught:
        bus.publish_sync("user.created", {"a": 1})
    assert "event_id=" in str(caught.value)
    good = _bus(prefix)
    assert good.publish_sync("user.created", {"a": 1}, event_id=caught.value.event_id) == caught.value.event_id
    assert good.publish_sync("user.created", {"a": 1}, event_id=caught.value.event_id) == caught.value.event_id
    assert len(_entries(good)) == 1


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _ping(url), timeout_s=10, what="a private redis-server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


def test_publish_into_a_full_redis_is_refused_and_nothing_earlier_is_evicted(full_redis: str) -> None:
    bus = _bus("full", url=full_redis)
    accepted = []
    with pytest.raises(PublishRefused, match="nothing was stored"):
        for i in range(100_000):
            accepted.append(bus.publish_sync("bulk.item.made", {"i": i, "pad": "x" * 500}))
    assert len(accepted) > 100
    stored = [decode_envelope(f[b"e"], 65536).event_id for f in _entries(bus)]
    assert stored == accepted  # every accepted event is still there, in order; no trimming


def test_publish_sync_reconnects_after_redis_closed_its_connection_and_reuses_one_connection(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus("reconnect", url=url)
        admin = redis.Redis.from_url(url)
        first = bus.publish_sync("user.created", {"a": 1})
        pool = bus.sync_client().connection_pool
        # the publisher's connection, kept at hand between calls (project.redis_conn._AtHand),
        # and the one that loaded the script into this new Redis
        conns = pool._in_use_connections | set(pool._available_connections)
        assert len(conns) == 2
        admin.client_kill_filter(_type="normal", skipme=True)  # Redis drops the publisher's connection
        second = bus.publish_sync("user.created", {"a": 2})  # found closed before the send: opened again
        assert pool._in_use_connections | set(pool._available_connections) == conns
        assert {decode_envelope(e, 1 << 20).event_id for e in _raw(admin, bus)} == {first, second}


def _lose_replies(monkeypatch: pytest.MonkeyPatch, error: Callable[[], Exception]) -> list[bool]:
    """For each True appended to the list returned, the next reply read is read, then lost:
    the connection is closed and ``error()`` raised in its place."""
    real = redis.connection.Connection.read_response
    lose: list[bool] = []

    def read_then_lose(self: redis.connection.Connection, *args: object, **kwargs: object) -> object:
        reply = real(self, *args, **kwargs)  # type: ignore[arg-type]
        if lose:
            lose.pop()
            self.disconnect()
            raise error()
        return reply

    monkeypatch.setattr(redis.connection.Connection, "read_response", read_then_lose)
    return lose


def test_publish_sync_whose_reply_is_lost_is_never_stored_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection fails after Redis stored the event, before its reply is read. With the
    client's default Retry (none), publish says the outcome is unknown and publishing again
    with its event_id stores nothing more; with a client that retries, the Retry sends it
    again at once and the dedup key hands back the first entry."""
    lose = _lose_replies(monkeypatch, lambda: redis.ConnectionError("connection lost while reading the reply"))
    with redis_server(tmp_path) as url:
        bus = _bus("lostreply", url=url)
        admin = redis.Redis.from_url(url)
        bus.publish_sync("user.created", {"a": 0})  # connected, script loaded
        lose.append(True)
        with pytest.raises(PublishOutcomeUnknown) as caught:
            bus.publish_sync("user.created", {"a": 1})
        event_id = caught.value.event_id
        assert bus.publish_sync("user.created", {"a": 1}, event_id=event_id) == event_id
        bus._sync_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1))
        lose.append(True)
        retried = bus.publish_sync("user.created", {"a": 2})
        assert not lose  # the reply was lost, and the Retry sent it again
        entries = admin.xrange(bus.keys.stream)
        assert len(entries) == 3
        for (entry_id, fields), expected in zip(entries[1:], (event_id, retried), strict=True):
            assert decode_envelope(fields[b"e"], 1 << 20).event_id == expected
            assert admin.get(bus.keys.published(expected)) == entry_id


def test_publish_sync_whose_reply_cannot_be_read_says_the_outcome_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the script; its reply came back garbled (a proxy, a protocol bug): the event is
    stored, so publish must not say that nothing was."""
    garble = _lose_replies(monkeypatch, lambda: redis.exceptions.InvalidResponse("Protocol Error: b'?'"))
    with redis_server(tmp_path) as url:
        bus = _bus("garbled", url=url)
        bus.publish_sync("user.created", {"a": 0})  # connected, script loaded
        garble.append(True)
        with pytest.raises(PublishOutcomeUnknown) as caught:
            bus.publish_sync("user.created", {"a": 1})
        event_id = caught.value.event_id
        assert bus.publish_sync("user.created", {"a": 1}, event_id=event_id) == event_id
        assert len(redis.Redis.from_url(url).xrange(bus.keys.stream)) == 2  # stored once


def test_publish_sync_loads_a_lost_script_again(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        bus = _bus("noscript", url=url)
        admin = redis.Redis.from_url(url)
        first = bus.publish_sync("user.created", {"a": 1})
        admin.script_flush()  # a Redis restarted without its scripts
        second = bus.publish_sync("user.created", {"a": 2})
        assert bus.publish_sync("user.created", {"a": 2}, event_id=second) == second  # still stored once
        assert {decode_envelope(e, 1 << 20).event_id for e in _raw(admin, bus)} == {first, second}


def _raw(client: redis.Redis, bus: EventBus) -> list[bytes]:
    return [fields[b"e"] for _, fields in client.xrange(bus.keys.stream)]


def test_a_duplicate_whose_entry_a_redis_user_may_not_take_back_is_refused_not_passed_as_new(tmp_path: Path) -> None:
    """A publishing user without XDEL: the repeated event_id raises PublishRefused, naming the
    cause, and the dedup key still names the first entry, which the router dispatches."""
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "publisher", "on", ">pw", "~*", "&*", "+@all", "-xdel")
        bus = _bus("acl", url=url.replace("redis://", "redis://publisher:pw@"))
        event_id = bus.publish_sync("user.created", {"a": 1})
        first_entry = admin.get(bus.keys.published(event_id))
        with pytest.raises(
            PublishRefused,
            match=r"published already, and its new entry .* could not be taken back .*: it stays in the stream.*XDEL",
        ) as refused:
            bus.publish_sync("user.created", {"a": 1}, event_id=event_id)
        assert event_id in str(refused.value)
        assert "nothing was stored" not in str(refused.value)
        assert admin.get(bus.keys.published(event_id)) == first_entry
        # The second XADD could not be taken back: it stays, marked as published (the
        # delivery gate keeps its copies from running the handlers again).
        entries = admin.xrange(bus.keys.stream)
        assert len(entries) == 2
        assert entries[0][0] == first_entry
        assert entries[1][1][b"p"] == b"1"

        # A user that may not SET either: the cause named is the dedup key, not a repeat.
        admin.execute_command("ACL", "SETUSER", "no-set", "on", ">pw", "~*", "&*", "+@all", "-xdel", "-set")
        other = _bus("acl", url=url.replace("redis://", "redis://no-set:pw@"))
        with pytest.raises(PublishRefused, match=r"could not get its dedup key \(.*\), and its new entry") as refused:
            other.publish_sync("user.created", {"a": 2})
        assert "published already" not in str(refused.value)
        assert admin.xlen(bus.keys.stream) == 3
        admin.close()


def test_await_publish_to_a_redis_that_does_not_answer_never_blocks_the_event_loop() -> None:
    # A listener that never accepts or reads: connecting works (the kernel's backlog), every
    # read waits for the socket timeout (5 s for the first question, whether it is a cluster).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        bus = EventBus(Settings(redis_url=f"redis://127.0.0.1:{port}/0?socket_timeout=5", events_prefix="silent",
                                event_contract_modules=[]))  # fmt: skip

        async def main() -> tuple[BaseException | str, float]:
            gaps: list[float] = []

            async def tick() -> None:
                last = asyncio.get_running_loop().time()
                while True:
                    await asyncio.sleep(0.05)
                    now = asyncio.get_running_loop().time()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            try:
                outcome: BaseException | str = await bus.publish("user.created", {"a": 1})
            except Exception as exc:
                outcome = exc
            finally:
                ticker.cancel()
                await bus.aclose()
            return outcome, max(gaps, default=float("inf"))  # no tick at all: it never ran

        outcome, longest_gap = asyncio.run(main())
    assert isinstance(outcome, PublishOutcomeUnknown), outcome
    assert longest_gap < 1.0, f"the event loop stood still for {longest_gap:.1f} s"
