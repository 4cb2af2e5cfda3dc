"""The handler modules the integration tests run in real workers (EVENT_HANDLER_MODULES).

Every handler counts its runs per (event_id, handler) in Redis, so tests can assert that
each delivery ran exactly once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, Field

from project.delivery import Event
from project.events import event_bus
from project.modules import BaseModule


def _count(event: dict[str, Any], handler: str) -> int:
    client = event_bus.sync_client()
    return int(client.hincrby(f"{event_bus.keys.prefix}:test:runs", f"{event['event_id']}:{handler}", 1))


def _remember(event: dict[str, Any], handler: str) -> None:
    client = event_bus.sync_client()
    client.rpush(f"{event_bus.keys.prefix}:test:seen:{handler}", json.dumps(event))


@event_bus.subscribe("user.birth_data.updated", queue="alpha")
def on_birth_data(event: dict[str, Any]) -> None:
    _count(event, "on_birth_data")
    _remember(event, "on_birth_data")


class StormWatchModule(BaseModule):
    """Subscribes in initialize(), with an async handler, on its own queue."""

    queue = "beta"

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("cosmic.solar_storm.detected", self.on_storm)
        self.subscribe(["bulk.*.made", "bulk.#"], self.on_bulk)  # overlapping: still one delivery

    async def on_storm(self, event: dict[str, Any]) -> None:
        _count(event, "on_storm")
        _remember(event, "on_storm")

    def on_bulk(self, event: dict[str, Any]) -> None:
        _count(event, "on_bulk")


@event_bus.subscribe("cosmic.*.detected", queue="alpha")
def on_any_detection(event: dict[str, Any]) -> None:
    _count(event, "on_any_detection")


@event_bus.subscribe("cosmic.#", queue="alpha")
def on_anything_cosmic(event: dict[str, Any]) -> None:
    _count(event, "on_anything_cosmic")


@event_bus.subscribe("bulk.item.made", queue="gamma")
def on_bulk_item(event: dict[str, Any]) -> None:
    _count(event, "on_bulk_item")


@event_bus.subscribe("flaky.job.requested", queue="gamma", max_retries=5)
def flaky(event: dict[str, Any]) -> None:
    """Fails on its first two attempts."""
    if _count(event, "flaky") < 3:
        raise RuntimeError("flaky failure")


@event_bus.subscribe("doomed.job.requested", queue="gamma", max_retries=2)
def doomed(event: dict[str, Any]) -> None:
    _count(event, "doomed")
    raise ValueError("always fails")


@event_bus.subscribe("module.error", queue="gamma", max_retries=0)
def on_module_error(event: dict[str, Any]) -> None:
    _remember(event, "on_module_error")
    if event["data"].get("event_type") == "doomed.job.requested":
        return
    raise RuntimeError("a failing module.error handler")


@event_bus.subscribe("loop.ping.sent", queue="gamma", max_retries=0)
def ping_again(event: dict[str, Any]) -> None:
    """A handler that re-publishes the event it handles: the loop guard must stop it."""
    _count(event, "ping_again")
    event_bus.publish_sync("loop.ping.sent", {"n": event["data"]["n"] + 1})


# -- the delivery policy: time limits, lost processes, long runs, exactly-once helpers -------


def _run_number(event: dict[str, Any], handler: str) -> int:
    return _count(event, handler)


@event_bus.subscribe("policy.slow.requested", queue="gamma", max_retries=2, time_limit_s=1.5)
def slow(event: dict[str, Any]) -> None:
    """Sleeps past its hard time limit (ignoring the soft one) on its first ``slow_runs`` runs."""
    if _run_number(event, "slow") <= event["data"].get("slow_runs", 0):
        try:
            time.sleep(30)
        except SoftTimeLimitExceeded:
            if event["data"].get("ignore_soft"):
                time.sleep(30)
            raise


@event_bus.subscribe("policy.crash.requested", queue="gamma", max_retries=2)
def crash(event: dict[str, Any]) -> None:
    """Kills its own process on its first ``crashes`` runs."""
    if _run_number(event, "crash") <= event["data"]["crashes"]:
        os._exit(1)


_CONCURRENCY_LUA = """
local r = redis.call('INCR', KEYS[1])
if r > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], r) end
return r
"""


@event_bus.subscribe("policy.long.requested", queue="gamma", max_retries=0)
def long_runner(event: dict[str, Any]) -> None:
    """Runs for ``sleep_s``, counting how many copies run at once."""
    # One hash tag: on a Redis Cluster the script's two keys must share a slot.
    client, tag = event_bus.sync_client(), f"{{{event_bus.keys.prefix}:test}}"
    client.eval(_CONCURRENCY_LUA, 2, f"{tag}:running", f"{tag}:max-running")
    try:
        _count(event, "long_runner")
        time.sleep(event["data"]["sleep_s"])
    finally:
        client.decr(f"{tag}:running")


@event_bus.subscribe("once.redis.requested", queue="gamma", max_retries=3)
def once_in_redis(event: Event) -> None:
    """Its effect (and an event it publishes) happen once, even if its process dies after."""
    _count(event, "once_in_redis")
    with event.redis_transaction() as pipe:
        pipe.hincrby(event.redis_key("test:effects"), f"{event['event_id']}:once_in_redis", 1)
        event_bus.publish_sync("once.redis.done", {"of": event["event_id"]})
    if event["data"].get("die_after_commit") and _runs(event, "once_in_redis") == 1:
        os._exit(1)


@event_bus.subscribe("once.sql.requested", queue="gamma", max_retries=3)
def once_in_sql(event: Event) -> None:
    """Its INSERT (and an event it publishes) happen once, even if its process dies after."""
    _count(event, "once_in_sql")
    with event.transaction() as conn:
        conn.execute(sa.text("INSERT INTO test_effects (event_id) VALUES (:e)"), {"e": event["event_id"]})
        event_bus.publish_sync("once.sql.done", {"of": event["event_id"]})
    if event["data"].get("die_after_commit") and _runs(event, "once_in_sql") == 1:
        os._exit(1)


def _runs(event: dict[str, Any], handler: str) -> int:
    raw = event_bus.sync_client().hget(f"{event_bus.keys.prefix}:test:runs", f"{event['event_id']}:{handler}")
    return int(raw or 0)


@event_bus.event("typed.order.placed", version=1)
class OrderPlacedV1(BaseModel):
    """Version 1: the total in cents."""

    total_cents: int = Field(ge=0)


@event_bus.event("typed.order.placed", version=2)
class OrderPlaced(BaseModel):
    """Version 2: an amount and a currency."""

    amount: int = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


@event_bus.upcaster("typed.order.placed", from_version=1)
def _order_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount": data["total_cents"], "currency": "EUR"}


@event_bus.subscribe("typed.order.placed", queue="gamma", max_retries=3)
def typed_order(event: Event[OrderPlaced]) -> None:
    """Typed: receives version 2, upcast from 1 where needed; bad data is dead at once."""
    _count(event, "typed_order")
    _remember({**event, "model": event.data.model_dump(), "model_type": type(event.data).__name__}, "typed_order")


@event_bus.subscribe("fixable.job.requested", queue="gamma", max_retries=0)
def fixable(event: dict[str, Any]) -> None:
    """Fails until the test sets its flag ("the handler was fixed"); then counts its run."""
    if not event_bus.sync_client().get(f"{event_bus.keys.prefix}:test:fixed"):
        raise RuntimeError("fixable is broken")
    _count(event, "fixable")
