"""The worker side: one Celery task per subscription, which runs its handler once per event."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task

from project.bus import EventBus
from project.context import handling
from project.registry import Subscription

__all__ = ["DeliveryTask", "register_tasks", "route_task"]

log = logging.getLogger("eventbus.delivery")

MODULE_ERROR = "module.error"

_loop: asyncio.AbstractEventLoop | None = None


def _run_coroutine(coro: Any) -> Any:
    # One loop per worker process, reused: async handlers may keep clients bound to it.
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def backoff_s(sub: Subscription, retries: int) -> float:
    """Exponential backoff with jitter: between half and all of base * 2**retries, capped."""
    ceiling = min(sub.backoff_max_s, sub.backoff_s * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


class DeliveryTask(Task):  # type: ignore[misc]
    """Runs one subscription's handler; made by :func:`register_tasks`, one per subscription."""

    subscription: Subscription
    bus: EventBus
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    typing = False

    def run(self, event: dict[str, Any]) -> str:
        sub, bus = self.subscription, self.bus
        # project.signals asked already, in the same round trip as recording "started".
        done = getattr(self.request, "eventbus_done", None)
        recorded = done is not None
        if not recorded:
            done = bool(bus.sync_client().exists(bus.keys.delivery_done(self.request.id)))
        if done:
            log.info("%s: delivery of %s already succeeded; skipped", sub.name, event.get("event_id"))
            return "duplicate"
        try:
            with handling(event, sub.module):
                result = sub.handler(event)
                if inspect.isawaitable(result):
                    _run_coroutine(result)
        except Exception as exc:
            retries = self.request.retries
            if retries < sub.max_retries:
                raise self.retry(exc=exc, countdown=backoff_s(sub, retries), max_retries=sub.max_retries) from exc
            self._report_dead(event, exc, attempts=retries + 1)
            raise
        if not recorded:  # otherwise the success signal marks it, with the "succeeded" record
            self.mark_done(bus.sync_client())
        return "ok"

    def mark_done(self, client: Any) -> None:
        """Remember that this delivery succeeded, so a later copy of its task is skipped."""
        client.set(self.bus.keys.delivery_done(self.request.id), 1, ex=self.bus.settings.delivery_done_ttl_s)

    def _report_dead(self, event: Mapping[str, Any], exc: BaseException, attempts: int) -> None:
        sub = self.subscription
        log.error("%s: gave up on event %s after %d attempts: %r", sub.name, event.get("event_id"), attempts, exc)
        if event.get("event_type") == MODULE_ERROR:
            return  # a failing module.error handler must not feed itself
        # The report is caused by the failed event but starts its hop count afresh: a chain
        # stopped by the hop limit must still be able to report it.
        try:
            with handling({**event, "hops": 0}, sub.module):
                self.bus.publish_sync(
                    MODULE_ERROR,
                    {
                        "handler": sub.name,
                        "queue": sub.queue,
                        "event_id": event.get("event_id"),
                        "event_type": event.get("event_type"),
                        "attempts": attempts,
                        "error": repr(exc)[:2000],
                    },
                    user_id=event.get("user_id"),
                    module=sub.module,
                )
        except Exception:  # the original failure is what the task reports; never mask it
            log.exception("%s: could not publish %s", sub.name, MODULE_ERROR)


def register_tasks(app: Celery, bus: EventBus) -> None:
    """Make one Celery task per subscription in ``bus``, named after its handler (idempotent)."""
    for sub in bus.registry:
        if sub.name in app.tasks:
            continue
        task_cls = type(
            f"Delivery[{sub.name}]",
            (DeliveryTask,),
            {
                "name": sub.name,
                "subscription": sub,
                "bus": bus,
                "max_retries": sub.max_retries,
                "time_limit": sub.time_limit_s,
                "__module__": __name__,
            },
        )
        app.register_task(task_cls())


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Celery router (``task_routes``): a delivery task goes to its subscription's queue."""
    sub = getattr(task, "subscription", None)
    if isinstance(sub, Subscription):
        return {"queue": sub.queue}
    return None
