"""Which handler of the fault suite listens to which events, as plain data.

``app.py`` subscribes its handlers from this table and the checker predicts from it which
(event, handler) deliveries every event must produce, without importing the handlers
(importing them would subscribe them on the test process's own bus).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["APP", "APP_V2", "ROUTES", "Route", "handler_name", "matching"]

APP = "tests.faults.app"
APP_V2 = "tests.faults.app_v2"


@dataclass(frozen=True, slots=True)
class Route:
    """One subscription of the fault suite."""

    short: str  # the handler function's name; runs are counted under it
    patterns: tuple[str, ...]
    queue: str
    # "plain": at least once (runs counted); "redis"/"sql": the effect must happen exactly once
    kind: str
    module: str = APP

    @property
    def name(self) -> str:
        """The Celery task name, as event_deliveries.handler records it."""
        return f"{self.module}.{self.short}"


ROUTES: tuple[Route, ...] = (
    Route("plain", ("fault.work.done", "fault.cache.done", "fault.ping.sent"), "fa", "plain"),
    Route("redis_effect", ("fault.work.done", "fault.cache.done"), "fa", "redis"),
    Route("sql_effect", ("fault.work.done",), "fb", "sql"),
    Route("self_killer", ("fault.suicide.requested",), "fc", "plain"),
    Route("overrunner", ("fault.overrun.requested",), "fc", "plain"),
    Route("long_runner", ("fault.long.requested",), "fa", "plain"),
    Route("fuzz_sink", ("fuzz.#",), "fa", "plain"),
    Route("on_module_error", ("module.error",), "fc", "plain"),
    Route("new_handler", ("deploy.feature.shipped",), "fa", "plain", module=APP_V2),
)
QUEUES = "fa,fb,fc"


def handler_name(short: str) -> str:
    """The task name of the route called ``short``."""
    return next(r.name for r in ROUTES if r.short == short)


def _match(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and (head in ("*", name[0])) and _match(rest, name[1:])


def matching(event_type: str, modules: tuple[str, ...] = (APP,)) -> list[Route]:
    """The routes of ``modules`` an event named ``event_type`` is delivered to."""
    segments = event_type.split(".")
    return [r for r in ROUTES if r.module in modules and any(_match(p.split("."), segments) for p in r.patterns)]
