"""Events about a user's own data."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from project.events import event_bus

__all__ = ["BirthDataUpdated"]


@event_bus.event("user.birth_data.updated", version=1)
class BirthDataUpdated(BaseModel):
    """A user's birth date, time or place changed: every profile computed from it is stale."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(gt=0, description="The user whose birth data changed (also the envelope's user_id).")
