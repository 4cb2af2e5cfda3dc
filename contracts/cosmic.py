"""Global cosmic events, published by the periodic checks (celery beat) with no user."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from project.events import event_bus

__all__ = ["FullMoon", "Severity", "SolarStormDetected", "SolarStormEnded"]

#: NOAA's geomagnetic storm scale: Kp 5, 6, 7, 8, 9 are G1 to G5.
Severity = Literal["G1", "G2", "G3", "G4", "G5"]


@event_bus.event("cosmic.solar_storm.detected", version=1)
class SolarStormDetected(BaseModel):
    """The planetary Kp index reached storm level (Kp >= 5)."""

    kp_index: float = Field(ge=0, le=9, description="The Kp reading that started the storm.")
    severity: Severity
    observed_at: str | None = Field(None, description="Time tag of that reading (ISO-8601, UTC).")
    started_at: str | None = Field(None, description="When the storm started (ISO-8601, UTC).")
    timestamp: str | None = Field(None, description="When the check noticed it (ISO-8601, UTC).")


@event_bus.event("cosmic.solar_storm.ended", version=1)
class SolarStormEnded(BaseModel):
    """The Kp index fell below storm level; the storm's peak and duration."""

    peak_severity: Severity
    peak_kp_index: float = Field(ge=0, le=9)
    started_at: str
    ended_at: str
    duration_s: int = Field(ge=0)
    timestamp: str | None = None


@event_bus.event("cosmic.full_moon", version=1)
class FullMoon(BaseModel):
    """The moon is full; ``at`` is the moment (ISO-8601, UTC, to the minute)."""

    at: str = Field(min_length=10, max_length=40)
