"""Publish → Redis → router → Celery worker → handler, and on record in PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import Stack
from tests.rabbitmq import WITH_CLUSTER

pytestmark = pytest.mark.brokers(*WITH_CLUSTER)


def test_application_publish_call_reaches_handler_and_events_log(stack: Stack) -> None:
    stack.start_worker()
    stack.start_router()
    bus = stack.bus()
    user_id = 4242
    stamp = datetime.now(UTC).isoformat()

    async def application() -> str:
        event_id = await bus.publish(
            "cosmic.solar_storm.detected",
            {"kp_index": 8, "severity": "G4", "timestamp": stamp, "user_id": user_id},
        )
        await bus.aclose()
        return event_id

    event_id = asyncio.run(application())

    seen = wait_for(lambda: stack.redis.lrange(f"{stack.prefix}:test:seen:on_storm", 0, -1), what="handler")
    event = json.loads(seen[0])
    assert event["event_id"] == event_id
    assert event["user_id"] == user_id
    assert event["data"]["kp_index"] == 8
    assert event["data"]["timestamp"] == stamp
    assert event["event_type"] == "cosmic.solar_storm.detected"

    rows = wait_for(lambda: stack.query("SELECT event_type, user_id, data, hops FROM events_log"), what="log row")
    assert [tuple(r) for r in rows] == [
        (
            "cosmic.solar_storm.detected",
            "4242",
            {"kp_index": 8, "severity": "G4", "timestamp": stamp, "user_id": user_id},
            0,
        )
    ]
    expected = {
        "tests.integration.app.StormWatchModule.on_storm": "beta",
        "tests.integration.app.on_any_detection": "alpha",
        "tests.integration.app.on_anything_cosmic": "alpha",
    }
    deliveries = stack.wait_query(
        "SELECT handler, queue, status, attempts FROM event_deliveries ORDER BY handler",
        until=lambda rows: len(rows) == 3 and all(r.status == "succeeded" for r in rows),
    )
    assert {d.handler: d.queue for d in deliveries} == expected
    assert all(d.attempts == 1 for d in deliveries)


def test_overlapping_patterns_give_one_delivery_per_handler(stack: Stack) -> None:
    stack.start_worker()
    stack.start_router()
    bus = stack.bus()
    ids = [bus.publish_sync("bulk.item.made", {"i": i}) for i in range(20)]
    runs = stack.wait_runs(40)
    assert runs == {f"{i}:{h}": 1 for i in ids for h in ("on_bulk", "on_bulk_item")}


def test_events_published_while_no_router_runs_are_dispatched_once_it_starts(stack: Stack) -> None:
    bus = stack.bus()
    ids = [bus.publish_sync("user.birth_data.updated", user_id=f"u{i}") for i in range(50)]
    stack.start_worker()
    stack.start_router()
    runs = stack.wait_runs(50)
    assert runs == {f"{i}:on_birth_data": 1 for i in ids}
    rows = stack.wait_query("SELECT event_id::text FROM events_log", until=lambda rows: len(rows) >= 50)
    assert {r.event_id for r in rows} == set(ids)


def test_event_nobody_subscribes_to_is_still_logged(stack: Stack) -> None:
    stack.start_router()
    event_id = stack.bus().publish_sync("nobody.listens.here", {"x": 1})
    rows = wait_for(lambda: stack.query("SELECT event_id::text, event_type FROM events_log"))
    assert [tuple(r) for r in rows] == [(event_id, "nobody.listens.here")]
    assert stack.query("SELECT count(*) FROM event_deliveries")[0][0] == 0
