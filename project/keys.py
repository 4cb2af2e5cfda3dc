"""Every Redis key, stream, channel and Celery queue name, built in one place under the prefix."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOG_GROUP", "ROUTER_GROUP", "Keys"]

ROUTER_GROUP = "router"
LOG_GROUP = "log-writer"


@dataclass(frozen=True, slots=True)
class Keys:
    """Names for one environment, all under ``prefix``."""

    prefix: str

    @property
    def stream(self) -> str:
        """The capped stream every published event is appended to."""
        return f"{self.prefix}:stream"

    @property
    def dead_letter(self) -> str:
        """Stream entries the router could not accept, with the reason."""
        return f"{self.prefix}:dead-letter"

    @property
    def log_buffer(self) -> str:
        """The durable buffer of event and delivery records on their way to PostgreSQL."""
        return f"{self.prefix}:log"

    @property
    def log_rejected(self) -> str:
        """Log records PostgreSQL refused or that could not be parsed, with the reason."""
        return f"{self.prefix}:log-rejected"

    @property
    def channel_pattern(self) -> str:
        """The PSUBSCRIBE pattern that receives every live event."""
        return f"{self.prefix}:*"

    def channel(self, event_type: str) -> str:
        """The pub/sub channel an event is broadcast on (channels and keys do not collide)."""
        return f"{self.prefix}:{event_type}"

    def event_type_of_channel(self, channel: str) -> str:
        """Invert :meth:`channel`."""
        return channel[len(self.prefix) + 1 :]

    @property
    def celery_keyprefix(self) -> str:
        """kombu's ``global_keyprefix``: Celery's queues and bookkeeping live under it."""
        return f"{self.prefix}:celery:"

    def celery_queue(self, queue: str) -> str:
        """The Redis list kombu reads a Celery queue from (priority 0)."""
        return f"{self.celery_keyprefix}{queue}"

    def delivery_done(self, task_id: str) -> str:
        """Set once a delivery succeeded, so a redelivered copy is skipped."""
        return f"{self.prefix}:done:{task_id}"

    @property
    def storm_state(self) -> str:
        """The solar storm in progress, if any: one event per storm, not per poll."""
        return f"{self.prefix}:cosmic:storm"

    def full_moon(self, moon: str) -> str:
        """Set once the full moon at ``moon`` (ISO date-time) has been announced."""
        return f"{self.prefix}:cosmic:full_moon:{moon}"

    @property
    def cosmic_latest(self) -> str:
        """The latest cosmic conditions, folded into every synthesis."""
        return f"{self.prefix}:cosmic:latest"

    @property
    def beat_lock(self) -> str:
        """Held by the one beat process that schedules."""
        return f"{self.prefix}:beat:leader"

    @property
    def memory_generation(self) -> str:
        """Counter whose increment invalidates every user's working memory at once."""
        return f"{self.prefix}:memory:generation"

    def memory_user(self, generation: int, user_id: str) -> str:
        """One user's working-memory hash, valid for one generation."""
        return f"{self.prefix}:memory:{generation}:{user_id}"
