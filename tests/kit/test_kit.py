"""The test kit (project.testing) on a small application, with nothing running: no Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from project import bus as bus_module
from project.errors import InvalidEventData
from project.settings import Settings, get_settings
from project.testing import HandlerFailed, InMemoryEvents
from tests.kit import app
from tests.kit.app import InvoiceSent, OrderPlaced, OrderPlacedV1

# Nothing listens here: a publish that reached Redis would fail, not pass silently.
SETTINGS = Settings(
    redis_url="redis://127.0.0.1:1/0",
    event_handler_modules=["tests.kit.app"],
    event_contract_modules=["tests.kit.app"],
    events_max_hops=3,
)


@pytest.fixture
def kit() -> Iterator[InMemoryEvents]:
    app.seen.clear()
    with InMemoryEvents(SETTINGS) as events:
        yield events


def test_publishing_is_recorded_not_sent(kit: InMemoryEvents) -> None:
    event_id = kit.publish("kit.order.placed", {"amount": 5, "currency": "CHF"}, user_id=7)
    (event,) = kit.published("kit.#")
    assert event.event_id == event_id and event.user_id == 7 and event["data"] == {"amount": 5, "currency": "CHF"}
    assert event.version == 2  # the latest contract validated it and is stamped
    assert kit.published("other.#") == []
    kit.publish("kit.order.placed", {"amount": 5, "currency": "CHF"}, user_id=7, event_id=event_id)
    assert len(kit.published()) == 1  # idempotent per event_id, as on Redis


def test_the_fixture_captures_every_bus_and_restores_after() -> None:
    assert bus_module._capture is None
    with InMemoryEvents(SETTINGS) as events:
        assert bus_module._capture is not None
        from project.events import event_bus

        event_bus.publish_sync("kit.loop.ping", {"n": 0})  # the process-wide bus, as module code does
        assert [e.event_type for e in events.published()] == ["kit.loop.ping"]
    assert bus_module._capture is None


def test_invalid_data_fails_at_the_call_site_naming_the_field(kit: InMemoryEvents) -> None:
    with pytest.raises(InvalidEventData, match="'currency'") as info:
        kit.publish("kit.order.placed", {"amount": 5, "currency": "euro"})
    assert info.value.errors[0]["loc"] == ("currency",)
    assert kit.published() == []


def test_run_follows_the_chain_with_typed_and_async_handlers(kit: InMemoryEvents) -> None:
    root = kit.publish(OrderPlaced(amount=42, currency="CHF"), user_id="u1")
    results = kit.run()
    assert sorted((r.handler, r.event_type, r.status) for r in results) == [
        ("tests.kit.app.BillingModule.bill", "kit.order.placed", "succeeded"),
        ("tests.kit.app.audit", "kit.invoice.sent", "succeeded"),
        ("tests.kit.app.audit", "kit.order.placed", "succeeded"),
    ]
    assert ("bill", OrderPlaced(amount=42, currency="CHF"), 2) in app.seen
    invoice = kit.assert_published("kit.invoice.sent", user_id="u1", data={"amount": 42, "currency": "CHF"})
    assert invoice.causation_id == root and invoice.correlation_id == root and invoice.hops == 1
    assert invoice.module == "billing"
    tree = kit.chain(root)
    assert tree.event_types() == ["kit.order.placed", "kit.invoice.sent"]
    assert "tests.kit.app.BillingModule.bill [succeeded]" in tree.render()


def test_a_version_1_event_reaches_a_version_2_handler_upcast(kit: InMemoryEvents) -> None:
    kit.publish(OrderPlacedV1(total_cents=250), user_id="u2")
    assert kit.published()[0].version == 1
    kit.run()
    assert ("bill", OrderPlaced(amount=250, currency="EUR"), 2) in app.seen
    kit.assert_published("kit.invoice.sent", data=InvoiceSent(amount=250, currency="EUR"))


def test_a_failing_handler_is_reported_with_its_traceback_after_the_others(kit: InMemoryEvents) -> None:
    kit.publish(OrderPlaced(amount=13, currency="CHF"))
    with pytest.raises(HandlerFailed) as info:
        kit.run()
    text = str(info.value)
    assert "tests.kit.app.BillingModule.bill" in text and "RuntimeError: unlucky amount" in text
    assert 'raise RuntimeError("unlucky amount")' in text  # the traceback, with the line
    assert [r.status for r in info.value.failures] == ["failed"]
    assert [r.status for r in kit.deliveries if r.handler == "tests.kit.app.audit"] == ["succeeded"]
    kit.assert_not_published("kit.invoice.sent")


def test_data_a_handler_contract_refuses_is_dead(kit: InMemoryEvents) -> None:
    # Published untyped from elsewhere (here: straight into the recorder, as a raw envelope).
    kit.bus._settings = SETTINGS.model_copy(update={"event_contract_modules": []})
    kit.bus._contracts_loaded = False
    kit.publish("kit.order.placed", {"amount": -1, "currency": "CHF"})
    results = kit.run(raise_errors=False)
    (dead,) = [r for r in results if r.status == "dead"]
    assert dead.handler == "tests.kit.app.BillingModule.bill"
    assert "ContractViolation" in (dead.error or "") and "'amount'" in (dead.error or "")


def test_the_loop_guard_stops_a_handler_that_republishes(kit: InMemoryEvents) -> None:
    kit.publish("kit.loop.ping", {"n": 0})
    with pytest.raises(HandlerFailed, match="HopLimitExceeded"):
        kit.run(only="tests.kit.app.ping_again")
    # The handler publishes on the process-wide bus, whose EVENTS_MAX_HOPS applies, as on a worker.
    hops = get_settings().events_max_hops
    assert [e["data"]["n"] for e in kit.published("kit.loop.ping")] == list(range(hops + 1))


def test_assert_published_shows_what_was_published_instead(kit: InMemoryEvents) -> None:
    kit.publish("kit.order.placed", {"amount": 5, "currency": "CHF"}, user_id=7)
    with pytest.raises(AssertionError) as info:
        kit.assert_published("kit.order.placed", user_id=8, data={"amount": 6})
    text = str(info.value)
    assert "user_id: expected 8, got 7" in text and "data['amount']: expected 6, got 5" in text
    with pytest.raises(AssertionError, match=r"published instead:\n  kit.order.placed"):
        kit.assert_published("kit.invoice.sent")
    with pytest.raises(AssertionError, match=r"expected no event 'kit\.#'"):
        kit.assert_not_published("kit.#")
    kit.assert_not_published("kit.order.placed", user_id=8)
    with pytest.raises(AssertionError, match="expected 2 event"):
        kit.assert_published("kit.order.placed", count=2)


def test_only_limits_which_handlers_run(kit: InMemoryEvents) -> None:
    kit.publish(OrderPlaced(amount=1, currency="CHF"))
    results = kit.run(only="tests.kit.app.audit")
    assert {r.handler for r in results} == {"tests.kit.app.audit"}
    kit.assert_not_published("kit.invoice.sent")


def test_the_plugin_fixture_is_registered(events: InMemoryEvents) -> None:
    assert isinstance(events, InMemoryEvents) and bus_module._capture == events._capture
