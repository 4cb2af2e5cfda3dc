"""Synthesis engine: new module profiles and cosmic events give new syntheses."""

from __future__ import annotations

import json
from typing import Any

from project.modules import BaseModule
from tasks import synthesis


class SynthesisEngineModule(BaseModule):
    """Subscribes in ``initialize()``; runs on the ``synthesis`` queue."""

    name = "synthesis"

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("module.profile.calculated", self.on_profile)
        # '#', not '*': cosmic.solar_storm.detected has three segments.
        self.subscribe("cosmic.#", self.on_cosmic)

    def on_profile(self, event: dict[str, Any]) -> None:
        """One user's profile changed: synthesize that user."""
        synthesis.synthesize_users([int(event["user_id"])], event)

    def on_cosmic(self, event: dict[str, Any]) -> None:
        """Remember the conditions; synthesize the user, or every active user in chunks."""
        client = self.bus.sync_client()
        client.hset(self.bus.keys.cosmic_latest, event["event_type"], json.dumps(event["data"]))
        if event["user_id"] is not None:
            synthesis.synthesize_users([int(event["user_id"])], event)
        else:
            synthesis.fan_out(event)
