"""Reports, into Redis, which modules of the cosmic application a process has imported."""

from __future__ import annotations

import json
import os
import sys

from project.events import event_bus
from tests.second_app.keys import ShopKeys

__all__ = ["cosmic_modules", "report_imports"]


def cosmic_modules() -> list[str]:
    """The modules of ``tasks`` and ``handlers`` (the cosmic application) in ``sys.modules``."""
    return sorted(m for m in sys.modules if m in ("tasks", "handlers") or m.startswith(("tasks.", "handlers.")))


def report_imports(where: str) -> None:
    """Append ``{"where", "pid", "argv", "cosmic"}`` to the shop's imports list."""
    report = {"where": where, "pid": os.getpid(), "argv": sys.argv, "cosmic": cosmic_modules()}
    event_bus.sync_client().rpush(ShopKeys(event_bus.keys.prefix).imports, json.dumps(report))
