"""The example application's event contracts: the data of every event it publishes.

Any module may import this package (``from contracts import BirthDataUpdated``); modules
still never import each other. Each model is declared with ``@event_bus.event(name,
version=N)`` (:mod:`project.contracts`); ``eventbus contracts check`` compares them with
``contracts.lock.json`` and fails on a breaking change made without a new version.
"""

from __future__ import annotations

from contracts.cosmic import FullMoon, SolarStormDetected, SolarStormEnded
from contracts.profile import ProfileCalculated, ProfileCalculatedV1
from contracts.synthesis import SynthesisCompleted
from contracts.user import BirthDataUpdated

__all__ = [
    "BirthDataUpdated",
    "FullMoon",
    "ProfileCalculated",
    "ProfileCalculatedV1",
    "SolarStormDetected",
    "SolarStormEnded",
    "SynthesisCompleted",
]
