"""The synthesis engine finished a user's synthesis."""

from __future__ import annotations

from pydantic import BaseModel, Field

from project.events import event_bus

__all__ = ["SynthesisCompleted"]


@event_bus.event("synthesis.completed", version=1)
class SynthesisCompleted(BaseModel):
    """A user's synthesis was stored; ``trigger`` is the event type that caused it."""

    trigger: str = Field(min_length=3, max_length=255, description="The event type that triggered the synthesis.")
