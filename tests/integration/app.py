"""The handler modules the integration tests run in real workers (EVENT_HANDLER_MODULES).

Every handler counts its runs per (event_id, handler) in Redis, so tests can assert that
each delivery ran exactly once.
"""

from __future__ import annotations

import json
from typing import Any

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
