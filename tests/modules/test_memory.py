"""The memory module: a user's new birth data drops their cache; a cosmic event drops everyone's."""

from __future__ import annotations

from project.events import event_bus
from project.testing import EventRecorder
from tasks.keys import app_keys
from tasks.memory import ActiveMemory


def _memory() -> ActiveMemory:
    return ActiveMemory(event_bus.sync_client(), app_keys(event_bus))


def test_new_birth_data_drops_that_users_cache_only(events: EventRecorder) -> None:
    memory = _memory()
    memory.put("41", {"summary": "stale"})
    memory.put("42", {"summary": "kept"})
    events.publish("user.birth_data.updated", {"user_id": 41}, module="demo")
    events.run(only="handlers.memory.*")
    assert memory.get("41") == {}
    assert memory.get("42") == {"summary": "kept"}


def test_a_global_cosmic_event_drops_every_cache_once(events: EventRecorder) -> None:
    memory = _memory()
    memory.put("42", {"summary": "stale"})
    before = memory.generation()
    events.publish("cosmic.full_moon", {"at": "2026-11-24T15:00"}, module="cosmic")
    events.run(only="handlers.memory.*")
    assert memory.generation() == before + 1
    assert memory.get("42") == {}
