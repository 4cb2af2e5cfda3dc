"""Synthesis engine: new module profiles and cosmic events give new syntheses."""

from __future__ import annotations

from typing import Any

from contracts import ProfileCalculated
from project.event import Event
from project.modules import BaseModule
from tasks import synthesis
from tasks.db import engine


class SynthesisEngineModule(BaseModule):
    """Subscribes in ``initialize()``; runs on the ``synthesis`` queue."""

    name = "synthesis"
    publishes = ("synthesis.completed",)

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("module.profile.calculated", self.on_profile)
        # '#', not '*': cosmic.solar_storm.detected has three segments.
        self.subscribe("cosmic.#", self.on_cosmic)

    def on_profile(self, event: Event[ProfileCalculated]) -> None:
        """One user's profile changed (version 1 events arrive upcast): synthesize that user."""
        self._synthesize_user(event)

    def on_cosmic(self, event: Event) -> None:  # every cosmic.* type: the envelope dict
        """Remember the conditions; synthesize the user, or every active user in chunks."""
        # Idempotent, so outside the exactly-once block: a rerun folds the same event again.
        synthesis.fold_cosmic(event["event_type"], event["data"])
        if event["user_id"] is not None:
            self._synthesize_user(event)
        else:
            # The chunk tasks are not deliveries: each skips itself once done (tasks.synthesis).
            synthesis.fan_out(event)

    @staticmethod
    def _synthesize_user(event: Event[Any]) -> None:
        # The row and the delivery's "handled" record commit together; synthesis.completed
        # is sent right after the commit, so its handlers find the row.
        with event.transaction(engine()) as conn:
            done = synthesis.synthesize_users(conn, [int(event["user_id"])], event)
            synthesis.publish_completed(done, event)
