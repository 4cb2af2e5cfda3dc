"""Every Redis key of the cosmic application, built in one place under the environment's prefix.

The dispatcher's own keys (stream, log buffer, Celery queues, beat lock) are in
``project.keys``; these are the application's, under the same ``EVENTS_PREFIX`` so that
environments sharing one Redis stay apart here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from project.bus import EventBus

__all__ = ["AppKeys", "app_keys"]


@dataclass(frozen=True, slots=True)
class AppKeys:
    """The application's key names for one environment, all under ``prefix``."""

    prefix: str

    @property
    def storm_state(self) -> str:
        """The solar storm in progress, if any: one event per storm, not per poll."""
        return f"{self.prefix}:cosmic:storm"

    @property
    def storm_check_lock(self) -> str:
        """Held by the one storm check reading and writing :attr:`storm_state`."""
        return f"{self.storm_state}:check"

    def full_moon(self, moon: str) -> str:
        """Set once the full moon at ``moon`` (ISO date-time) has been announced."""
        return f"{self.prefix}:cosmic:full_moon:{moon}"

    @property
    def cosmic_latest(self) -> str:
        """The latest cosmic conditions, folded into every synthesis."""
        return f"{self.prefix}:cosmic:latest"

    def synthesis_chunk(self, task_id: str) -> str:
        """A synthesis chunk task's claim: ``running`` while a copy runs, then ``done``."""
        return f"{self.prefix}:synthesis:chunk:{task_id}"

    @property
    def memory_generation(self) -> str:
        """Counter whose increment invalidates every user's working memory at once."""
        return f"{self.prefix}:memory:generation"

    def memory_user(self, generation: int, user_id: str) -> str:
        """One user's working-memory hash, valid for one generation."""
        return f"{self.prefix}:memory:{generation}:{user_id}"


def app_keys(bus: EventBus) -> AppKeys:
    """The application's keys for the environment ``bus`` publishes to (its ``EVENTS_PREFIX``)."""
    return AppKeys(bus.keys.prefix)
