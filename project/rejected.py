"""Task messages a worker refused, kept whole; those of an unknown task are sent again on request.

A worker that does not know a task (a rolling deploy where the router has a handler the
workers do not have yet, or a typo in ``EVENT_HANDLER_MODULES``) would drop its message.
The ``task_unknown`` receiver (:mod:`project.signals`) keeps it in ``<prefix>:rejected-tasks``
and records the delivery ``rejected``; :func:`requeue_rejected` puts such messages back on
their queues once workers have the handler. A message a worker could not read at all
(:mod:`project.malformed`) is kept in the same stream, marked ``malformed``: it is listed with
the rest, and never sent again, since it would fail the same way.

On a Redis Cluster the rejected-tasks stream is one for the environment while each delivery's
record goes to its event's scope (another slot): no transaction can hold both, so the
messages are sent and confirmed (RabbitMQ), then recorded ``dispatched`` in their scopes,
then deleted from the stream. A run that dies between two steps leaves the entries to be
sent again by the next, with the same task ids (a worker runs a delivery once), and so loses
none.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from project.broker import sender_for
from project.bus import EventBus
from project.keys import Keys
from project.malformed import MALFORMED_FIELD
from project.messages import TaskMessage
from project.records import delivery_record
from project.redis_conn import require_amqp_on_cluster

__all__ = ["RejectedTask", "drop_malformed", "list_rejected", "requeue_rejected"]


@dataclass(frozen=True, slots=True)
class RejectedTask:
    """One kept message: its stream entry id, task (handler) name, task id, queue and reason."""

    entry_id: str
    task: str
    task_id: str
    queue: str
    reason: str
    fields: dict[str, str]

    @property
    def malformed(self) -> bool:
        """A message no worker could read (:mod:`project.malformed`): kept to be looked at, not sent."""
        return self.fields.get(MALFORMED_FIELD) == "1"


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

    Malformed messages are not sent, nor returned: they stay in the stream.

    Each message goes back with its task id, so a worker runs it once as usual; the entry
    leaves the rejected-tasks stream in the same transaction (on a Redis Cluster, right after:
    see the module's docstring), and the delivery is recorded ``dispatched`` again.
    """
    rejected = [r for r in list_rejected(bus, handler) if not r.malformed]
    if dry_run or not rejected:
        return rejected
    keys = bus.keys
    require_amqp_on_cluster(bus.settings)  # on a cluster, nothing could take the tasks otherwise
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
    if keys.cluster:
        _record_then_forget(bus, rejected, tasks)
        return rejected
    pipe = bus.sync_client().pipeline(transaction=True)
    for r, task in zip(rejected, tasks, strict=True):
        if sender is None:
            pipe.lpush(keys.celery_queue(r.queue), task.redis_form())
        pipe.xdel(keys.rejected_tasks, r.entry_id)
        event = _event_of(task)
        if event is not None:
            pipe.xadd(keys.log_buffer, {"r": _dispatched(event[0], r)})
    pipe.execute()
    return rejected


def drop_malformed(bus: EventBus) -> list[RejectedTask]:
    """Delete the malformed messages from the rejected-tasks stream (once looked at); return them."""
    malformed = [r for r in list_rejected(bus) if r.malformed]
    if malformed:
        bus.sync_client().xdel(bus.keys.rejected_tasks, *(r.entry_id for r in malformed))
    return malformed


def _event_of(task: TaskMessage) -> tuple[str, str] | None:
    """``(event_id, event_type)`` of a delivery task's envelope; None if it holds none."""
    try:
        envelope = json.loads(task.body)[0][0]
        return str(envelope["event_id"]), str(envelope.get("event_type") or "")
    except (ValueError, LookupError, TypeError, AttributeError):
        return None


def _dispatched(event_id: str, r: RejectedTask) -> str:
    return delivery_record(event_id, r.task, "dispatched", None, "sent again from rejected-tasks")


def _record_then_forget(bus: EventBus, rejected: list[RejectedTask], tasks: list[TaskMessage]) -> None:
    """On a Redis Cluster, after the tasks were sent and confirmed: record each delivery in its
    scope's log buffer (a transaction per scope, one slot each), then drop the entries."""
    client, keys = bus.sync_client(), bus.keys
    by_scope: defaultdict[Keys, list[str]] = defaultdict(list)
    for r, task in zip(rejected, tasks, strict=True):
        event = _event_of(task)
        if event is not None:
            by_scope[keys.scoped(event[1])].append(_dispatched(event[0], r))
    for scoped, records in by_scope.items():
        pipe = client.pipeline(transaction=True)
        for record in records:
            pipe.xadd(scoped.log_buffer, {"r": record})
        pipe.execute()
    client.xdel(keys.rejected_tasks, *(r.entry_id for r in rejected))
