"""Task messages a worker refused (no such task there), kept whole and sent again on request.

A worker that does not know a task (a rolling deploy where the router has a handler the
workers do not have yet, or a typo in ``EVENT_HANDLER_MODULES``) would drop its message.
The ``task_unknown`` receiver (:mod:`project.signals`) keeps it in ``<prefix>:rejected-tasks``
and records the delivery ``rejected``; :func:`requeue_rejected` puts such messages back on
their queues once workers have the handler.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from project.broker import sender_for
from project.bus import EventBus
from project.messages import TaskMessage
from project.records import delivery_record

__all__ = ["RejectedTask", "list_rejected", "requeue_rejected"]


@dataclass(frozen=True, slots=True)
class RejectedTask:
    """One kept message: its stream entry id, task (handler) name, task id, queue and reason."""

    entry_id: str
    task: str
    task_id: str
    queue: str
    reason: str
    fields: dict[str, str]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def list_rejected(bus: EventBus, handler: str | None = None, count: int = 10_000) -> list[RejectedTask]:
    """The kept messages, oldest first, optionally only those of ``handler``."""
    entries: Any = bus.sync_client().xrange(bus.keys.rejected_tasks, count=count)
    found = []
    for entry_id, raw in entries:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if handler is None or fields.get("task") == handler:
            found.append(
                RejectedTask(
                    _text(entry_id), fields.get("task", ""), fields.get("id", ""), fields.get("queue", ""),
                    fields.get("reason", ""), fields,
                )
            )  # fmt: skip
    return found


def requeue_rejected(bus: EventBus, handler: str | None = None, dry_run: bool = False) -> list[RejectedTask]:
    """Send the kept messages (of ``handler``, or all) back to their queues; return them.

    Each message goes back with its task id, so a worker runs it once as usual; the entry
    leaves the rejected-tasks stream in the same transaction, and the delivery is recorded
    ``dispatched`` again.
    """
    rejected = list_rejected(bus, handler)
    if dry_run or not rejected:
        return rejected
    keys = bus.keys
    tasks = [
        TaskMessage(r.queue, r.task_id, base64.b64decode(r.fields["body"]), json.loads(r.fields["headers"]))
        for r in rejected
    ]
    sender = sender_for(bus.settings)
    if sender is not None:  # RabbitMQ: confirmed before the entries leave the stream
        try:
            sender.send(tasks)
        finally:
            sender.close()
    pipe = bus.sync_client().pipeline(transaction=True)
    for r, task in zip(rejected, tasks, strict=True):
        body = task.body
        if sender is None:
            pipe.lpush(keys.celery_queue(r.queue), task.redis_form())
        pipe.xdel(keys.rejected_tasks, r.entry_id)
        try:
            event_id = json.loads(body)[0][0]["event_id"]
        except (ValueError, LookupError, TypeError):
            continue
        note = "sent again from rejected-tasks"
        pipe.xadd(keys.log_buffer, {"r": delivery_record(event_id, r.task, "dispatched", None, note)})
    pipe.execute()
    return rejected
