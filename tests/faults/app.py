"""The handlers the fault suite runs in real workers (EVENT_HANDLER_MODULES=tests.faults.app).

Every handler counts its runs per (event_id, handler) in ``<prefix>:test:runs`` and marks
itself busy in ``<prefix>:test:busy`` (worker pid -> delivery) while it runs, so a scenario
can pick a process that is mid-task to kill. Effects of the exactly-once handlers go to
``<prefix>:test:effects`` (Redis) and the ``fault_effects`` table (PostgreSQL). An event's
``data`` may say ``sleep_s`` (how long the handler works) and the handler-specific knobs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from redis.backoff import NoBackoff
from redis.retry import Retry

from project.events import event_bus
from tests.faults.routes import ROUTES

_client: tuple[int, redis.Redis] | None = None

# INCR the delivery's running count and keep the highest value seen.
_ENTER_LUA = """
local v = redis.call('INCR', KEYS[1])
local m = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if v > m then redis.call('HSET', KEYS[2], ARGV[1], v) end
return v
"""


def _redis() -> redis.Redis:
    # One client per process (the pool forks after the module is imported). No retries: a
    # command retried after a lost reply could count a run twice; a failed one fails the run.
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(os.environ["REDIS_URL"], retry=Retry(NoBackoff(), 0)))
    return _client[1]


def _key(name: str) -> str:
    return f"{os.environ['EVENTS_PREFIX']}:test:{name}"


def _subscribe(short: str, **options: Any) -> Any:
    """``event_bus.subscribe`` with the patterns and queue ``routes.py`` gives ``short``."""
    route = next(r for r in ROUTES if r.short == short)
    return event_bus.subscribe(list(route.patterns), queue=route.queue, **options)


def _nap(event: dict[str, Any], share: float = 1.0) -> None:
    seconds = float(event["data"].get("sleep_s", 0)) * share
    if seconds > 0:
        time.sleep(seconds)


@contextmanager
def _running(event: dict[str, Any], short: str) -> Iterator[int]:
    """Count a run of this delivery and mark this process busy with it while inside."""
    client = _redis()
    field = f"{event['event_id']}:{short}"
    node = os.environ.get("FAULT_NODE", "host")
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(_key("runs"), field, 1)
    pipe.hset(_key("busy"), f"{node}:{os.getpid()}", field)
    pipe.hincrby(_key("node-runs"), node, 1)
    run = int(pipe.execute()[0])
    try:
        yield run
    finally:
        client.hdel(_key("busy"), f"{node}:{os.getpid()}")


@_subscribe("plain")
def plain(event: dict[str, Any]) -> None:
    """At least once: only counts its runs."""
    with _running(event, "plain"):
        _nap(event)


@_subscribe("redis_effect")
def redis_effect(event: dict[str, Any]) -> None:
    """Exactly once: its effect commits in one MULTI/EXEC with the delivery's done marker."""
    with _running(event, "redis_effect"):
        _nap(event, 0.5)
        with event.redis_transaction() as pipe:  # type: ignore[attr-defined]
            pipe.hincrby(_key("effects"), f"{event['event_id']}:redis_effect", 1)
        _nap(event, 0.5)


@_subscribe("sql_effect", max_retries=8, backoff_s=0.5, backoff_max_s=3)  # rides out a short PG outage
def sql_effect(event: dict[str, Any]) -> None:
    """Exactly once: its INSERT commits in one transaction with the delivery's inbox row."""
    with _running(event, "sql_effect"):
        _nap(event, 0.5)
        with event.transaction() as conn:  # type: ignore[attr-defined]
            conn.execute(
                sa.text("INSERT INTO fault_effects (event_id, handler, pid) VALUES (:e, 'sql_effect', :p)"),
                {"e": event["event_id"], "p": os.getpid()},
            )
        _nap(event, 0.5)


@_subscribe("self_killer", max_retries=2)
def self_killer(event: dict[str, Any]) -> None:
    """SIGKILLs its own process on its first ``data.kills`` attempts."""
    with _running(event, "self_killer") as attempt:
        if attempt <= int(event["data"].get("kills", 0)):
            os.kill(os.getpid(), signal.SIGKILL)


@_subscribe("overrunner", time_limit_s=2, max_retries=2)
def overrunner(event: dict[str, Any]) -> None:
    """On its first attempt works for 10 s, five times its 2 s limit.

    ``data.mode`` "soft" lets the soft limit's exception end it; "hard" swallows that
    exception and runs on into the hard limit, which kills the process.
    """
    with _running(event, "overrunner") as attempt:
        if attempt > 1:
            return
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                time.sleep(max(0.0, end - time.monotonic()))
            except SoftTimeLimitExceeded:
                if event["data"].get("mode") != "hard":
                    raise


@_subscribe("long_runner", time_limit_s=150)
def long_runner(event: dict[str, Any]) -> None:
    """Works ``data.sleep_s``, longer than the visibility timeout, counting copies running at once."""
    client = _redis()
    event_id = event["event_id"]
    running = _key(f"running:{event_id}")
    with _running(event, "long_runner"):
        client.eval(_ENTER_LUA, 2, running, _key("max-running"), event_id)
        try:
            _nap(event)
        finally:
            client.decr(running)


@_subscribe("fuzz_sink")
def fuzz_sink(event: dict[str, Any]) -> None:
    """Receives the fuzzed events that have a valid name."""
    with _running(event, "fuzz_sink"):
        pass


@_subscribe("on_module_error", max_retries=0)
def on_module_error(event: dict[str, Any]) -> None:
    """Keeps every module.error report, for the scenarios that expect one."""
    with _running(event, "on_module_error"):
        _redis().rpush(_key("module-errors"), json.dumps(event))
