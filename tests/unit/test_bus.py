"""Bad calls fail at the call site with a typed, explanatory error; no server needed."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from project.bus import EventBus
from project.context import handling
from project.envelope import decode_envelope, encode_envelope, validate_event_name
from project.errors import (
    DuplicateHandler,
    EventBusError,
    HopLimitExceeded,
    InvalidEventData,
    InvalidEventName,
    InvalidPattern,
    InvalidSubscription,
    MalformedEnvelope,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from project.modules import BaseModule
from project.settings import Settings


def _encode(event_type: str, data: Any = None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("user_id", None)
    _, raw = encode_envelope(event_type, data, module=None, max_bytes=64 * 1024, max_hops=16, **kw)
    return json.loads(raw)  # type: ignore[no-any-return]


def handler_one(event: dict[str, Any]) -> None:
    pass


def handler_two(event: dict[str, Any]) -> None:
    pass


@pytest.mark.parametrize("name", ["user.created", "cosmic.solar_storm.detected", "a.b.c.d", "x1.y_2"])
def test_valid_event_names_pass(name: str) -> None:
    assert validate_event_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["user", "a.b.c.d.e", "User.created", "user.*", "user.#", "user..x", "1user.x", "user.created ", 7],
)
def test_invalid_event_names_are_refused(name: Any) -> None:
    with pytest.raises(InvalidEventName):
        validate_event_name(name)


def test_applications_payload_keys_are_lifted_into_the_envelope() -> None:
    stamp = datetime.now(UTC).isoformat()
    env = _encode("cosmic.solar_storm.detected", {"kp_index": 8, "severity": "G4", "timestamp": stamp, "user_id": 42})
    assert env["user_id"] == 42
    assert env["data"] == {"kp_index": 8, "severity": "G4", "timestamp": stamp, "user_id": 42}
    assert uuid.UUID(env["event_id"])
    assert datetime.fromisoformat(env["timestamp"]).tzinfo is not None
    assert env["correlation_id"] == env["event_id"] and env["causation_id"] is None and env["hops"] == 0
    assert decode_envelope(json.dumps(env), 64 * 1024).user_id == 42


def test_conflicting_user_ids_are_refused() -> None:
    with pytest.raises(InvalidEventData, match="contradicts"):
        _encode("user.created", {"user_id": 1}, user_id=2)


def test_data_must_be_a_json_object() -> None:
    with pytest.raises(InvalidEventData):
        _encode("user.created", [1, 2])


@pytest.mark.parametrize("data", [{"when": datetime.now(UTC)}, {"x": {1, 2}}, {"nan": float("nan")}, {"o": object()}])
def test_data_that_is_not_json_serialisable_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(PayloadNotSerializable, match=r"user\.created"):
        _encode("user.created", data)


def test_data_over_the_size_limit_is_refused() -> None:
    with pytest.raises(PayloadTooLarge, match="EVENTS_MAX_DATA_BYTES"):
        _encode("user.created", {"blob": "x" * 70_000})


def test_publishing_inside_a_handler_carries_the_chain_and_stops_at_the_hop_limit() -> None:
    root = _encode("loop.ping.sent")
    with handling(root, "pinger"):
        child = _encode("loop.ping.sent")
    assert (child["causation_id"], child["correlation_id"], child["hops"]) == (
        root["event_id"],
        root["event_id"],
        1,
    )
    assert child["module"] == "pinger"
    with handling({**child, "hops": 16}, None), pytest.raises(HopLimitExceeded, match="EVENTS_MAX_HOPS=16"):
        _encode("loop.ping.sent")


def test_every_error_shares_one_root() -> None:
    for exc in (
        InvalidEventName,
        InvalidPattern,
        DuplicateHandler,
        PayloadTooLarge,
        HopLimitExceeded,
        MalformedEnvelope,
        InvalidSubscription,
        InvalidEventData,
        PayloadNotSerializable,
    ):
        assert issubclass(exc, EventBusError)


def test_decorator_and_call_subscribe_and_duplicates_are_refused() -> None:
    bus = EventBus(Settings())
    decorated = bus.subscribe("user.#", queue="q")(handler_one)
    assert decorated is handler_one
    sub = bus.subscribe(["cosmic.*", "cosmic.#"], handler_two)
    assert sub.queue == "test_bus" and sub.name == "tests.unit.test_bus.handler_two"
    with pytest.raises(DuplicateHandler, match="already subscribed"):
        bus.subscribe("other.thing", handler_one)
    assert [s.name for s in bus.registry.match("cosmic.full_moon")] == [sub.name]
    assert [s.name for s in bus.registry.match("user.created")] == ["tests.unit.test_bus.handler_one"]


def test_bad_subscriptions_fail_at_the_call_site() -> None:
    bus = EventBus(Settings())
    with pytest.raises(InvalidPattern, match="can never match"):
        bus.subscribe("a.b.c.d.e", handler_one)
    with pytest.raises(InvalidSubscription, match="queue"):
        bus.subscribe("a.b", handler_one, queue="bad queue!")
    with pytest.raises(InvalidSubscription, match="max_retries"):
        bus.subscribe("a.b", handler_one, max_retries=-1)
    with pytest.raises(InvalidSubscription, match="name="):
        bus.subscribe("a.b", lambda e: None)
    with pytest.raises(TypeError):
        bus.subscribe("a.b", handler_one, retries=3)  # type: ignore[call-overload]
    assert len(bus.registry) == 0


class SolarModule(BaseModule):
    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("user.birth_data.updated", self.recalculate)

    def recalculate(self, event: dict[str, Any]) -> None:
        pass


def test_module_subscribes_on_its_own_queue_once() -> None:
    bus = EventBus(Settings())
    modules = bus.load_modules(["tests.unit.test_bus"])
    assert [type(m) for m in modules] == [SolarModule]
    assert bus.load_modules(["tests.unit.test_bus"]) == modules  # idempotent
    (sub,) = bus.registry.match("user.birth_data.updated")
    assert (sub.queue, sub.module, sub.name) == (
        "solar",
        "solar",
        "tests.unit.test_bus.SolarModule.recalculate",
    )


def test_unknown_handler_module_is_a_clear_error() -> None:
    with pytest.raises(EventBusError, match="EVENT_HANDLER_MODULES names 'no_such_module'"):
        EventBus(Settings()).load_modules(["no_such_module"])


def test_settings_read_handler_modules_as_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_HANDLER_MODULES", "handlers, app.more ,")
    monkeypatch.setenv("EVENTS_PREFIX", "staging")
    s = Settings()
    assert s.event_handler_modules == ["handlers", "app.more"]
    assert s.events_prefix == "staging"


def test_done_markers_must_outlast_redelivery() -> None:
    with pytest.raises(ValueError, match="DELIVERY_DONE_TTL_S"):
        Settings(delivery_done_ttl_s=60, broker_visibility_timeout_s=3600)
