"""Solar module: a user's new birth data gives a new solar profile."""

from __future__ import annotations

from contracts import BirthDataUpdated, ProfileCalculated
from project.event import Event
from project.modules import BaseModule
from tasks import solar
from tasks.db import engine


class SolarModule(BaseModule):
    """Subscribes in ``initialize()``; runs on the ``solar`` queue."""

    publishes = ("module.profile.calculated",)

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("user.birth_data.updated", self.recalculate)

    def recalculate(self, event: Event[BirthDataUpdated]) -> None:
        """Recompute and store the profile, then announce it, both once per delivery."""
        user_id = event.data.user_id
        # The profile and the delivery's "handled" record commit together; the announcement
        # is sent right after the commit, so a rerun after a crash neither redoes nor loses it.
        with event.transaction(engine()) as conn:
            profile = solar.recalculate(conn, user_id, event.event_id)
            if profile is not None:
                self.publish_sync(
                    ProfileCalculated(module=self.name, signs={"sun": profile["sun_sign"]}), user_id=user_id
                )
