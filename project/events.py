"""The process-wide event bus: ``from project.events import event_bus``."""

from __future__ import annotations

from project.bus import EventBus

__all__ = ["event_bus"]

event_bus = EventBus(shared=True)
