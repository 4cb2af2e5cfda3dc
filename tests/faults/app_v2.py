"""A handler module only the new release has: the rolling-deploy scenario's router knows it,
the old workers do not (EVENT_HANDLER_MODULES=tests.faults.app,tests.faults.app_v2)."""

from __future__ import annotations

from typing import Any

from project.events import event_bus
from tests.faults.app import _running


@event_bus.subscribe("deploy.feature.shipped", queue="fa")
def new_handler(event: dict[str, Any]) -> None:
    """Counts its runs."""
    with _running(event, "new_handler"):
        pass
