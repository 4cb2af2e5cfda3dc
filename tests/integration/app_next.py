"""A handler only the next release has: in a rolling deploy the router knows it first."""

from __future__ import annotations

from typing import Any

from project.events import event_bus


@event_bus.subscribe("user.birth_data.updated", queue="alpha")
def on_birth_data_next(event: dict[str, Any]) -> None:
    client = event_bus.sync_client()
    client.hincrby(f"{event_bus.keys.prefix}:test:runs", f"{event['event_id']}:on_birth_data_next", 1)
