"""Typed contracts on real workers: upcasting, and data a contract refuses ends dead at once."""

from __future__ import annotations

import json

import pytest

from project.errors import InvalidEventData
from tests.conftest import wait_for
from tests.integration.app import OrderPlaced, OrderPlacedV1
from tests.integration.conftest import Stack

APP = "tests.integration.app"
DELIVERY = "SELECT status, attempts, error FROM event_deliveries WHERE event_id = :e AND handler = :h"


def _seen(stack: Stack) -> list[dict[str, object]]:
    raw = stack.redis.lrange(f"{stack.prefix}:test:seen:typed_order", 0, -1)
    return [json.loads(r) for r in raw]


def test_a_typed_handler_gets_its_model_upcast_from_older_versions(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    old = bus.publish_sync(OrderPlacedV1(total_cents=250), user_id="u1")
    new = bus.publish_sync(OrderPlaced(amount=7, currency="CHF"), user_id="u1")
    seen = wait_for(lambda: (s := _seen(stack)) and len(s) == 2 and s, what="both orders handled")
    by_id = {s["event_id"]: s for s in seen}
    assert by_id[old]["model"] == {"amount": 250, "currency": "EUR"} and by_id[old]["model_type"] == "OrderPlaced"
    assert by_id[old]["version"] == 2  # the handler sees the version its model is
    assert by_id[new]["model"] == {"amount": 7, "currency": "CHF"}
    rows = stack.wait_query(
        "SELECT event_id, status FROM event_deliveries WHERE handler = :h",
        until=lambda r: len(r) == 2 and all(x.status == "succeeded" for x in r),
        h=f"{APP}.typed_order",
    )
    assert {str(r.event_id) for r in rows} == {old, new}
    logged = stack.wait_query(
        "SELECT event_id::text AS event_id, version FROM events_log WHERE event_type = 'typed.order.placed'",
        until=lambda r: len(r) == 2,
    )
    assert {r.event_id: r.version for r in logged} == {old: 1, new: 2}  # as published, for a rebuild


def test_data_its_contract_refuses_is_dead_at_once_with_the_reason(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    # This bus does not load the app's contracts, so publish cannot refuse the data: the worker must.
    event_id = stack.bus().publish_sync("typed.order.placed", {"amount": 5, "currency": "euro"})
    row = stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "dead", e=event_id, h=f"{APP}.typed_order")[0]
    assert row.attempts == 1  # max_retries=3, but no retry can fix the data
    assert "ContractViolation" in row.error and "'currency'" in row.error
    report = wait_for(
        lambda: stack.query("SELECT data FROM events_log WHERE event_type = 'module.error'"), what="module.error"
    )[0].data
    assert report["event_id"] == event_id and "'currency'" in report["error"]
    assert stack.runs() == {}  # the handler never ran


def test_publish_refuses_invalid_data_at_the_call_site_and_stores_nothing(stack: Stack) -> None:
    stack.env["EVENT_CONTRACT_MODULES"] = APP
    bus = stack.bus()
    import tests.integration.app  # noqa: F401  # the contracts are declared on import

    with pytest.raises(InvalidEventData, match="field 'currency'"):
        bus.publish_sync("typed.order.placed", {"amount": 5, "currency": "euro"})
    assert stack.redis.xlen(bus.keys.stream) == 0
    event_id = bus.publish_sync("typed.order.placed", {"amount": 5, "currency": "EUR"})
    (entry,) = stack.redis.xrange(bus.keys.stream)
    envelope = json.loads(entry[1][b"e"])
    assert envelope["event_id"] == event_id and envelope["version"] == 2
