"""Contracts: declaring, validating, upcasting, and reading a handler's Event[Model] annotation."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Literal

import pytest
from pydantic import BaseModel, Field

from project.bus import EventBus
from project.contracts import Contracts, dataschema_uri, handler_model, parse_dataschema
from project.errors import ContractViolation, InvalidContract, InvalidEventData, InvalidSubscription
from project.event import Event
from project.settings import Settings

if TYPE_CHECKING:
    from project.event import Event as TypeOnlyEvent


class StormV1(BaseModel):
    kp: int = Field(ge=0, le=9)


class Storm(BaseModel):
    kp_index: float = Field(ge=0, le=9)
    severity: Literal["G1", "G2", "G3", "G4", "G5"]


class Other(BaseModel):
    x: int


@pytest.fixture
def registry() -> Contracts:
    c = Contracts()
    c.declare("space.storm.seen", StormV1, version=1)
    c.declare("space.storm.seen", Storm, version=2)
    c.add_upcaster("space.storm.seen", 1, lambda d: {"kp_index": d["kp"], "severity": f"G{max(1, d['kp'] - 4)}"})
    return c


def test_declaring_the_same_version_twice_or_badly_is_refused(registry: Contracts) -> None:
    registry.declare("space.storm.seen", Storm, version=2)  # the same model again: a no-op
    with pytest.raises(InvalidContract, match="version 2 is already declared by"):
        registry.declare("space.storm.seen", Other, version=2)
    with pytest.raises(InvalidContract, match="one model per contract"):
        registry.declare("space.other.seen", Storm, version=1)
    with pytest.raises(InvalidContract, match="version must be an int >= 1"):
        registry.declare("space.x.seen", Other, version=0)
    with pytest.raises(InvalidContract, match="invalid event name"):
        registry.declare("Space", Other)
    with pytest.raises(InvalidContract, match="pydantic BaseModel"):
        registry.declare("space.y.seen", dict)  # type: ignore[arg-type]
    with pytest.raises(InvalidContract, match="already has an upcaster"):
        registry.add_upcaster("space.storm.seen", 1, lambda d: d)


def test_outgoing_validates_against_the_latest_version_and_names_the_field(registry: Contracts) -> None:
    assert registry.outgoing("space.storm.seen", {"kp_index": 7, "severity": "G3"}) == (
        {"kp_index": 7.0, "severity": "G3"},
        2,
    )
    with pytest.raises(InvalidEventData, match="field 'severity'") as info:
        registry.outgoing("space.storm.seen", {"kp_index": 7, "severity": "G9"})
    assert [e["loc"] for e in info.value.errors] == [("severity",)]
    assert pickle.loads(pickle.dumps(info.value)).errors == info.value.errors  # crosses Celery's processes
    assert registry.outgoing("space.untyped.seen", {"a": 1}) == ({"a": 1}, None)


def test_within_keeps_only_contracts_declared_under_the_given_packages(registry: Contracts) -> None:
    assert registry.get("space.storm.seen", within=[__name__]) is not None
    assert registry.get("space.storm.seen", within=["somewhere.else"]) is None
    assert registry.outgoing("space.storm.seen", {"anything": 1}, within=["somewhere.else"]) == ({"anything": 1}, None)


def test_an_instance_publishes_as_its_own_version(registry: Contracts) -> None:
    assert registry.of_instance(StormV1(kp=6)) == ("space.storm.seen", {"kp": 6}, 1)
    bad = Storm(kp_index=5, severity="G1")
    bad.kp_index = 12  # assignment is not validated by pydantic: publish checks again
    with pytest.raises(InvalidEventData, match="kp_index"):
        registry.of_instance(bad)
    with pytest.raises(InvalidEventData, match="not a declared event contract"):
        registry.of_instance(Other(x=1))


def test_incoming_upcasts_older_versions_and_refuses_what_does_not_fit(registry: Contracts) -> None:
    envelope: dict[str, Any] = {"event_id": "e1", "event_type": "space.storm.seen", "data": {"kp": 8}, "version": 1}
    model, data = registry.incoming(envelope, Storm)
    assert model == Storm(kp_index=8, severity="G4") and data == {"kp_index": 8, "severity": "G4"}
    # No version: taken as the handler's own if it fits, else upcast from the oldest.
    assert registry.incoming({**envelope, "version": None, "data": {"kp_index": 5, "severity": "G1"}}, Storm)[1] == {
        "kp_index": 5,
        "severity": "G1",
    }
    assert registry.incoming({**envelope, "version": None}, Storm)[0] == Storm(kp_index=8, severity="G4")
    with pytest.raises(ContractViolation, match="field 'severity'"):
        registry.incoming({**envelope, "version": 2, "data": {"kp_index": 5, "severity": "G7"}}, Storm)
    with pytest.raises(ContractViolation, match=r"upcaster of 'space\.storm\.seen' from version 1 failed"):
        registry.incoming({**envelope, "data": {"nope": 1}}, Storm)


def test_a_missing_upcaster_is_a_clear_violation() -> None:
    c = Contracts()
    c.declare("space.storm.seen", StormV1, version=1)
    c.declare("space.storm.seen", Storm, version=2)
    with pytest.raises(ContractViolation, match="no upcaster from version 1"):
        c.incoming({"event_type": "space.storm.seen", "data": {"kp": 1}, "version": 1}, Storm)


def test_dataschema_uris_round_trip() -> None:
    uri = dataschema_uri("cosmic.solar_storm.detected", 3)
    assert uri == "urn:eventbus:contract:cosmic.solar_storm.detected:v3"
    assert parse_dataschema(uri) == ("cosmic.solar_storm.detected", 3)
    assert parse_dataschema("https://example.org/schema.json") is None


def typed(event: Event[Storm]) -> None: ...


def untyped(event: Event) -> None: ...


def plain(event: dict[str, Any]) -> None: ...


def type_only(event: TypeOnlyEvent) -> None: ...


def wrong(event: Event[int]) -> None: ...


def test_handler_model_reads_the_annotation() -> None:
    assert handler_model(typed) is Storm
    assert handler_model(untyped) is None
    assert handler_model(plain) is None
    assert handler_model(type_only) is None  # a name only imported for type checking: the dict
    assert handler_model(lambda event: None) is None
    with pytest.raises(InvalidContract, match="use a pydantic model"):
        handler_model(wrong)


def test_a_typed_handler_must_subscribe_to_its_contracts_event_type() -> None:
    from project.contracts import contracts

    if contracts.for_model(Storm) is None:
        contracts.declare("unit.storm.seen", Storm, version=1)
    bus = EventBus(Settings(event_contract_modules=[]))
    with pytest.raises(InvalidSubscription, match="none of its patterns"):
        bus.subscribe("unit.other.seen", typed)
    sub = bus.subscribe("unit.#", typed)
    assert sub.model is Storm
    with pytest.raises(InvalidSubscription, match="use a pydantic model"):
        bus.subscribe("unit.#", wrong)
