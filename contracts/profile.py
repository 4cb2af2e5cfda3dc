"""A module computed a user's profile.

Version 1 carried one sign, ``sun_sign``. Version 2 carries every sign the module computed,
by body, so that a module computing the moon or the ascendant uses the same event. That is
a breaking change (a field removed), so it is a new version, and the upcaster below lets a
handler written for version 2 receive events still published as version 1.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from project.events import event_bus

__all__ = ["ProfileCalculated", "ProfileCalculatedV1", "Sign"]

Sign = Literal[
    "aries", "taurus", "gemini", "cancer", "leo", "virgo",
    "libra", "scorpio", "sagittarius", "capricorn", "aquarius", "pisces",
]  # fmt: skip


@event_bus.event("module.profile.calculated", version=1)
class ProfileCalculatedV1(BaseModel):
    """Version 1: the module and the user's sun sign."""

    module: str = Field(min_length=1, max_length=100)
    sun_sign: Sign


@event_bus.event("module.profile.calculated", version=2)
class ProfileCalculated(BaseModel):
    """A module stored a new profile for the event's user: its signs, by body."""

    module: str = Field(min_length=1, max_length=100, description="The module that computed the profile.")
    signs: dict[Literal["sun", "moon", "ascendant"], Sign] = Field(
        min_length=1, description="Each body's sign, at least one."
    )


@event_bus.upcaster("module.profile.calculated", from_version=1)
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"module": data["module"], "signs": {"sun": data["sun_sign"]}}
