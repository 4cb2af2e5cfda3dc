"""Active working memory: stale per-user caches are dropped when their inputs change."""

from __future__ import annotations

from contracts import BirthDataUpdated
from project.event import Event
from project.events import event_bus
from project.modules import BaseModule
from tasks.keys import app_keys
from tasks.memory import ActiveMemory
from tasks.settings import get_app_settings


def _memory() -> ActiveMemory:
    return ActiveMemory(event_bus.sync_client(), app_keys(event_bus), get_app_settings().memory_ttl_s)


class ActiveWorkingMemoryModule(BaseModule):
    """Subscribes in ``initialize()``: a user's new birth data makes their cache stale."""

    name = "memory"

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("user.birth_data.updated", self.invalidate_user)

    def invalidate_user(self, event: Event[BirthDataUpdated]) -> None:
        """Drop the cache of the user the event concerns."""
        with event.redis_transaction() as pipe:
            _memory().invalidate_user(str(event.data.user_id), pipe)


@event_bus.subscribe("cosmic.#", queue="memory")
def invalidate_everyone(event: Event) -> None:  # every cosmic.* type: the envelope dict
    """A global cosmic event changes every user's context: one O(1) generation bump.

    Once per event, with the delivery's done mark in the same MULTI/EXEC: a redelivered copy
    does not bump the generation a second time.
    """
    with event.redis_transaction() as pipe:
        if event["user_id"] is None:
            _memory().invalidate_all(pipe)
        else:
            _memory().invalidate_user(str(event["user_id"]), pipe)
