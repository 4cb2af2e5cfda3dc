"""The router's dispatch call sends an entry's tasks only while the entry is still its own:
not after another router took it over, not a second time when its reply was lost and the
call was sent again. Each test runs in-process against a private redis-server, stalling or
breaking the router's own connection at the moment that matters."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.connection

from project.consumer import ensure_group
from project.keys import ROUTER_GROUP, Keys
from project.registry import Registry, Subscription
from project.router import Router
from project.settings import Settings
from tests.conftest import wait_for
from tests.integration.redis_server import redis_server

QUEUE = "alpha"
EVENTS = 5


def _settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "events_prefix": f"own{uuid.uuid4().hex[:8]}",
        "router_claim_idle_ms": 200,
        "router_block_ms": 50,
        "router_trim_interval_s": 3600,
    }
    values.update(overrides)
    return Settings(**values)


def _registry() -> Registry:
    registry = Registry()
    registry.add(Subscription(name="tests.ownership.on_made", patterns=("own.#",), handler=lambda e: None,
                              queue=QUEUE, module=None, max_retries=0, backoff_s=1.0, backoff_max_s=1.0))  # fmt: skip
    return registry


def _add(client: redis.Redis, keys: Keys) -> str:
    envelope = {
        "event_id": str(uuid.uuid4()),
        "event_type": "own.item.made",
        "user_id": 1,
        "data": {},
        "timestamp": "2026-01-01T00:00:00+00:00",
        "module": "shop",
        "causation_id": None,
        "correlation_id": None,
        "hops": 0,
    }
    entry_id: Any = client.xadd(keys.stream, {"e": json.dumps(envelope)})
    return str(entry_id.decode())


def _task_ids(client: redis.Redis, keys: Keys) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(keys.celery_queue(QUEUE), 0, -1)]


def _pending(client: redis.Redis, keys: Keys, consumer: str | None = None) -> int:
    if consumer is None:
        return int(client.xpending(keys.stream, ROUTER_GROUP)["pending"])
    return len(client.xpending_range(keys.stream, ROUTER_GROUP, "-", "+", 1000, consumername=consumer))


def _taken_over(taker: Router) -> bool:
    """Let ``taker`` claim what was idle long enough (and dispatch it); whether it has all of them."""
    taker.loop.claim_abandoned()
    return taker.stats.entries == EVENTS


def _is_dispatch_call(conn: Any, command: Any, router: Router) -> bool:
    """Whether ``command``, about to be sent on ``conn``, is ``router``'s dispatch script."""
    chunks = command if isinstance(command, list | tuple) else [command]
    head = bytes(chunks[0][:128]) if chunks else b""
    return conn.client_name == router.client.get_connection_kwargs().get("client_name") and (
        b"EVALSHA" in head and router._script.sha.encode() in head
    )


@contextmanager
def _before_dispatch_call(monkeypatch: pytest.MonkeyPatch, router: Router, hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` once, just before ``router``'s first dispatch call leaves the process."""
    real: Any = redis.connection.AbstractConnection.send_packed_command
    armed = [True]

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if armed and _is_dispatch_call(self, command, router):
            armed.clear()
            hook()
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    yield
    assert not armed, "the router sent no dispatch call"


def _two_routers(url: str) -> tuple[Keys, redis.Redis, Router, Router]:
    """Routers ``a`` and ``b`` of one group on ``url``, and EVENTS entries for them to read."""
    settings = _settings(url)
    keys = Keys(settings.events_prefix)
    admin = redis.Redis.from_url(url)
    ensure_group(admin, keys.stream, ROUTER_GROUP)
    a, b = (Router(settings, _registry(), consumer=c, client=redis.Redis.from_url(url, client_name=f"router-{c}"))
            for c in "ab")  # fmt: skip
    for _ in range(EVENTS):
        _add(admin, keys)
    return keys, admin, a, b


def test_a_router_stalled_just_before_its_call_left_sends_nothing_a_taker_over_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The router decided to send the call, then stalled (SIGSTOP, a VM pause, a long GC)
    # before its bytes left, past ROUTER_CLAIM_IDLE_MS: another router took the entries over
    # and dispatched them meanwhile. Only a check made by Redis when the call runs sees that.
    with redis_server(tmp_path) as url:
        keys, admin, stalled, taker = _two_routers(url)

        def take_over() -> None:
            wait_for(lambda: _taken_over(taker), what="router b's takeover")

        with _before_dispatch_call(monkeypatch, stalled, take_over):
            assert stalled.loop.read_once(">", block_ms=None) == EVENTS
        ids = _task_ids(admin, keys)
        assert len(ids) == EVENTS and len(set(ids)) == EVENTS, "an event was dispatched twice"
        assert (stalled.stats.entries, stalled.stats.skipped) == (0, EVENTS)
        assert _pending(admin, keys) == 0


def test_a_router_that_read_entries_long_before_dispatching_them_skips_those_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with redis_server(tmp_path) as url:
        keys, admin, slow, taker = _two_routers(url)

        def dispatch_late(entries: Any) -> None:  # stalled after the read, before its call was made
            wait_for(lambda: _taken_over(taker), what="router b's takeover")
            slow.dispatch(entries)

        monkeypatch.setattr(slow.loop, "handle", dispatch_late)
        assert slow.loop.read_once(">", block_ms=None) == EVENTS
        ids = _task_ids(admin, keys)
        assert len(ids) == EVENTS and len(set(ids)) == EVENTS
        assert (slow.stats.entries, slow.stats.skipped) == (0, EVENTS)
        assert (taker.stats.entries, taker.stats.skipped) == (EVENTS, 0)


def _client(url: str, redis_py_retries: bool) -> redis.Redis:
    if not redis_py_retries:  # from_url: no Retry (the router's own client, project.redis_conn)
        return redis.Redis.from_url(url, client_name="router")
    port = int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    return redis.Redis(host="127.0.0.1", port=port, client_name="router")  # redis-py's default Retry


@pytest.mark.parametrize("redis_py_retries", [False, True], ids=["router-reads-again", "redis-py-sends-again"])
def test_a_dispatch_call_whose_reply_is_lost_after_it_ran_sends_each_task_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_py_retries: bool
) -> None:
    # Redis ran the call; its reply is lost with the connection. redis-py's Retry sends it
    # again at once, or the router reads its pending entries again: nothing is sent twice.
    real_send: Any = redis.connection.AbstractConnection.send_packed_command
    real_read: Any = redis.connection.AbstractConnection.read_response
    routers: list[Router] = []
    armed: list[Any] = []  # the connection a dispatch call was just sent on
    lost: list[Any] = []  # the reply that never reached the router

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if not lost and routers and _is_dispatch_call(self, command, routers[0]):
            armed[:] = [self]
        real_send(self, command, check_health)

    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not armed or armed[0] is not self:
            return real_read(self, *args, **kwargs)
        armed.clear()
        reply = real_read(self, *args, **kwargs)  # an error reply (NOSCRIPT) raises: not this one
        lost.append(reply)
        self.disconnect()
        raise redis.ConnectionError("connection lost while reading the dispatch call's reply")

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read)
    with redis_server(tmp_path) as url:
        settings = _settings(url, router_claim_idle_ms=30_000)
        keys = Keys(settings.events_prefix)
        admin = redis.Redis.from_url(url)
        ensure_group(admin, keys.stream, ROUTER_GROUP)
        router = Router(settings, _registry(), consumer="r", client=_client(url, redis_py_retries))
        routers.append(router)
        stop = threading.Event()
        thread = threading.Thread(target=router.run, args=(stop,))
        thread.start()
        try:
            for _ in range(EVENTS):
                _add(admin, keys)
            wait_for(lambda: lost, what="a dispatch reply lost")
            wait_for(lambda: _pending(admin, keys) == 0 and admin.xlen(keys.log_buffer) > 0, what="all acknowledged")
            # One more event after the loss: the router goes on.
            _add(admin, keys)
            wait_for(lambda: len(_task_ids(admin, keys)) >= EVENTS + 1, what="the later event dispatched")
        finally:
            stop.set()
            thread.join(timeout=20)
        ids = _task_ids(admin, keys)
        assert len(ids) == EVENTS + 1 and len(set(ids)) == EVENTS + 1, "a task was sent twice"
        assert admin.xlen(keys.log_buffer) == EVENTS + 1  # and each record written once
        assert int(lost[0][4]) > 0, "the lost call sent no task: the test proved nothing"
        assert _pending(admin, keys) == 0
