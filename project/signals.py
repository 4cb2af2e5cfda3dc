"""Celery signal receivers that record every delivery's progress in the log buffer.

The router records the event and each ``dispatched`` delivery inside its dispatch script;
deliveries that Celery itself publishes (a retry) and every state change on the workers
arrive here. Each receiver does one XADD; PostgreSQL is never touched on this path.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from project.delivery import DeliveryTask
from project.eventlog import delivery_record

__all__ = ["connect"]

log = logging.getLogger("eventbus.signals")


def _record(
    task: Any, status: str, error: str | None = None, request: Any = None, pipe: Any = None
) -> list[Any] | None:
    """Append the delivery's new status to the log buffer (in ``pipe`` if given, then run it)."""
    req = request or task.request
    args = req.args or ()
    event = args[0] if args and isinstance(args[0], dict) else {}
    try:
        pipe = pipe if pipe is not None else task.bus.sync_client().pipeline(transaction=False)
        pipe.xadd(
            task.bus.keys.log_buffer,
            {
                "r": delivery_record(
                    event_id=str(event.get("event_id")),
                    handler=task.name,
                    queue=(req.delivery_info or {}).get("routing_key") or task.subscription.queue,
                    task_id=req.id,
                    status=status,
                    attempt=(req.retries or 0) + 1,
                    error=error[:4000] if error else None,
                )
            },
        )
        return list(pipe.execute())
    except Exception:  # recording must never fail the task itself
        log.exception("could not record %s of %s", status, task.name)
        return None


# One round trip at each end of a delivery: "started" goes with the check whether the
# delivery already succeeded (DeliveryTask.run reads the answer from the request), and
# "succeeded" goes, in one transaction, with the marker that makes later copies skip.


def _on_prerun(sender: Any = None, **_: Any) -> None:
    if not isinstance(sender, DeliveryTask):
        return
    pipe = sender.bus.sync_client().pipeline(transaction=False)
    pipe.exists(sender.bus.keys.delivery_done(sender.request.id))
    replies = _record(sender, "started", pipe=pipe)
    if replies is not None:
        sender.request.eventbus_done = bool(replies[0])


def _on_success(sender: Any = None, **_: Any) -> None:
    if not isinstance(sender, DeliveryTask):
        return
    pipe = sender.bus.sync_client().pipeline(transaction=True)
    sender.mark_done(pipe)
    _record(sender, "succeeded", pipe=pipe)


def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if isinstance(sender, DeliveryTask):
        _record(sender, "retrying", error=repr(getattr(reason, "exc", None) or reason), request=request)


def _on_failure(sender: Any = None, exception: Any = None, **_: Any) -> None:
    if not isinstance(sender, DeliveryTask):
        return
    dead = (sender.request.retries or 0) >= sender.subscription.max_retries
    _record(sender, "dead" if dead else "failed", error=repr(exception))


def connect() -> None:
    """Connect the receivers (idempotent: Celery ignores a second connect of the same one)."""
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="eventbus.prerun")
    signals.task_success.connect(_on_success, weak=False, dispatch_uid="eventbus.success")
    signals.task_retry.connect(_on_retry, weak=False, dispatch_uid="eventbus.retry")
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="eventbus.failure")
