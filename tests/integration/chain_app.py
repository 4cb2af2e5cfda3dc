"""The demo's chain in miniature, for the tracing test (``EVENT_HANDLER_MODULES``).

user.birth_data.updated → a "solar" handler publishes module.profile.calculated (and a
"memory" handler runs beside it) → a "synthesis" handler publishes synthesis.completed,
which nothing subscribes to. Each handler does only that, on the queue ``chain``.

Beside the chain: a handler of report.render.requested that always fails, twice, so that
its delivery goes dead and the worker reports it with a module.error.
"""

from __future__ import annotations

from project.delivery import Event
from project.events import event_bus


@event_bus.subscribe("user.birth_data.updated", queue="chain")
def recalculate(event: Event) -> None:
    """Stands in for SolarModule.recalculate."""
    event_bus.publish_sync("module.profile.calculated", {"profile_id": 1}, user_id=event["user_id"])


@event_bus.subscribe("user.birth_data.updated", queue="chain")
def invalidate_user(event: Event) -> None:
    """Stands in for ActiveWorkingMemoryModule.invalidate_user."""


@event_bus.subscribe("module.profile.calculated", queue="chain")
def on_profile(event: Event) -> None:
    """Stands in for SynthesisEngineModule.on_profile."""
    event_bus.publish_sync("synthesis.completed", {"synthesis_id": 1}, user_id=event["user_id"])


@event_bus.subscribe("report.render.requested", queue="chain", max_retries=1, backoff_s=0.05)
def render(event: Event) -> None:
    """Always fails: its delivery goes dead after two attempts."""
    raise ValueError("the renderer is broken")
