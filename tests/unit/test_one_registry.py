"""Subscriptions made by decorator or in initialize() reach every bus that loads the modules."""

from __future__ import annotations

import importlib

from project.bus import EventBus
from project.events import event_bus
from project.settings import Settings

APP = "tests.integration.app"


def test_a_fresh_bus_gets_decorator_subscriptions_of_modules_imported_before() -> None:
    importlib.import_module(APP)  # the decorators ran now, for the process-wide bus
    assert event_bus.registry.get(f"{APP}.on_birth_data") is not None

    fresh = EventBus(Settings(events_prefix="fresh", delivery_max_retries=7))
    fresh.load_modules([APP])
    names = {sub.name for sub in fresh.registry}
    assert f"{APP}.on_birth_data" in names  # by decorator
    assert f"{APP}.StormWatchModule.on_storm" in names  # in initialize()
    assert fresh.registry.get(f"{APP}.on_birth_data").max_retries == 7  # type: ignore[union-attr]  # its own settings
    assert fresh.registry.get(f"{APP}.flaky").max_retries == 5  # type: ignore[union-attr]  # as written
    assert [s.name for s in fresh.registry.match("user.birth_data.updated")] == [f"{APP}.on_birth_data"]

    again = EventBus(Settings(events_prefix="again"))
    again.load_modules([APP])
    assert {sub.name for sub in again.registry} == names
    fresh.load_modules([APP])  # idempotent
    assert {sub.name for sub in fresh.registry} == names


def test_a_bus_gets_only_the_declarations_of_the_modules_it_loads() -> None:
    importlib.import_module(APP)
    other = EventBus(Settings(events_prefix="other"))
    other.load_modules(["tests.integration.app_next"])
    assert {sub.name for sub in other.registry} == {"tests.integration.app_next.on_birth_data_next"}
