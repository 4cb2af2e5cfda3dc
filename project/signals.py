"""Celery signal receivers that record every delivery's progress in the log buffer.

The router records the event and each ``dispatched`` delivery inside its dispatch script,
and a delivery's success is recorded in the round trip that marks it done (``on_success``
in :mod:`project.delivery`, or the end of ``run`` for a first copy); every other change
arrives here, read from the signals' own arguments (task id, args, result) and from the
delivery's state the policy hooks left in Redis (attempts, retrying or dead), never from
``sender.request``. Each receiver makes one Redis round trip (a small
script that appends the record), and PostgreSQL is never touched on this path.

A task no worker knows (a rolling deploy, a typo in ``EVENT_HANDLER_MODULES``) is not
dropped: its message is kept whole in ``<prefix>:rejected-tasks`` and the delivery recorded
``rejected``; ``eventbus requeue-rejected`` sends it again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import signals

from project.bus import EventBus
from project.delivery import DeliveryTask
from project.events import event_bus
from project.malformed import message_fields
from project.observability import metrics
from project.redis_conn import LuaScript

__all__ = ["connect"]

log = logging.getLogger("eventbus.signals")

# KEYS: log buffer, delivery hash, shed counters, lease (the gate: 'done' or 'dead' once
# settled, see project.delivery; a first copy's delivery may have no hash).
# ARGV: event_id, handler, status, error, at, max records, policy. Status '' records the
# failure the hooks decided (retrying or dead); '?settled' records a done or dead delivery
# whose copy was skipped (so a success whose record was lost in a crash is recorded now).
_RECORD_LUA = """
if ARGV[7] == 'shed' and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[6]) then
  redis.call('HINCRBY', KEYS[3], 'd', 1)
  return 0
end
local st = ARGV[3]
local a = tonumber(redis.call('HGET', KEYS[2], 'attempts') or '0')
if st == '' or st == '?settled' then
  local s = redis.call('HGET', KEYS[2], 'state')
  if s ~= 'done' and s ~= 'dead' then
    local gate = redis.call('GET', KEYS[4])
    if gate == 'done' or gate == 'dead' then s = gate end
  end
  if s == 'done' and a == 0 then a = 1 end  -- a first copy's one attempt, never counted in the hash
  if st == '?settled' then
    if s == 'done' then st = 'succeeded' elseif s == 'dead' then st = 'dead' else return 0 end
  elseif s == 'done' then return 0  -- a stale attempt's failure after another copy finished
  elseif s == 'dead' or s == 'retrying' then st = s else st = 'failed' end
end
local err = cjson.null
if ARGV[4] ~= '' then err = ARGV[4] end
redis.call('XADD', KEYS[1], '*', 'r', cjson.encode({'d', tonumber(ARGV[5]), ARGV[1], ARGV[2], st, a, err}))
return 1
"""
_RECORD = LuaScript(_RECORD_LUA)


def _record(
    handler: str,
    task_id: str,
    event: Any,
    status: str,
    error: str | None = None,
    bus: EventBus = event_bus,
) -> None:
    """Append the delivery's new status to the log buffer; never fails the task.

    ``event``: the task's envelope (a dict), or ``(event_id, event_type)``.
    """
    event_id, event_type = (event.get("event_id"), event.get("event_type")) if isinstance(event, dict) else event
    if not event_id:
        return  # not a delivery (no envelope): nothing to record it under
    try:
        keys, s = bus.keys, bus.settings
        if keys.cluster:  # the log buffer and delivery of the event's scope: one slot
            keys = keys.scoped(str(event_type or ""))
        _RECORD(
            bus.sync_client(),
            [keys.log_buffer, keys.delivery(task_id), keys.log_shed, keys.lease(task_id)],
            str(event_id or ""),
            handler,
            status,
            (error or "")[:4000],
            f"{time.time():.6f}",
            s.log_buffer_max_records,
            s.log_buffer_full_policy,
        )
    except Exception:  # recording must never fail the task itself
        log.exception("could not record %s of %s[%s]", status or "the failure", handler, task_id)


def _envelope(args: Any) -> dict[str, Any]:
    return args[0] if args and isinstance(args[0], dict) else {}


def _on_postrun(sender: Any = None, task_id: str | None = None, args: Any = None, state: Any = None, **_: Any) -> None:
    # A copy skipped on start (Celery's IGNORED state): record the state the delivery is
    # settled in, in case the copy that settled it died before its own record.
    if isinstance(sender, DeliveryTask) and task_id and state == "IGNORED":
        _record(sender.name, task_id, _envelope(args), "?settled", bus=sender.bus)


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, args: Any = None, **_: Any
) -> None:
    if isinstance(sender, DeliveryTask) and task_id:
        _record(sender.name, task_id, _envelope(args), "", error=repr(exception), bus=sender.bus)


def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    # The delivery policy retries by sending the task again from on_failure; this is
    # Celery's own retry path (task_retry_on_worker_lost, for example).
    if isinstance(sender, DeliveryTask) and request is not None:
        _record(sender.name, request.id, _envelope(request.args), "retrying", error=repr(reason), bus=sender.bus)


def _on_unknown(sender: Any = None, message: Any = None, name: str | None = None, id: Any = None, **_: Any) -> None:
    keys = event_bus.keys
    try:
        entry: dict[Any, Any] = message_fields(message)  # whole: requeue-rejected sends it again as it came
        queue = entry["queue"]
        args = json.loads(message.body)[0] if message.content_type == "application/json" else []
        entry.update(
            task=name or "",
            id=str(id or ""),
            reason=f"no task {name!r} on this worker (EVENT_HANDLER_MODULES differs?)",
            at=f"{time.time():.6f}",
        )
        event_bus.sync_client().xadd(keys.rejected_tasks, entry)
    except Exception:
        log.exception("could not keep the message of unknown task %s[%s]", name, id)
        return
    log.error(
        "task %s[%s] is unknown to this worker: kept in %s, recorded rejected; "
        "run `eventbus requeue-rejected` once a worker has it",
        name, id, keys.rejected_tasks,
    )  # fmt: skip
    metrics.record_rejected(str(name))
    _record(str(name), str(id), _envelope(args), "rejected", error=f"unknown task {name!r} on a worker of {queue!r}")


def connect() -> None:
    """Connect the receivers (idempotent: Celery ignores a second connect of the same one)."""
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="eventbus.postrun")
    signals.task_retry.connect(_on_retry, weak=False, dispatch_uid="eventbus.retry")
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="eventbus.failure")
    signals.task_unknown.connect(_on_unknown, weak=False, dispatch_uid="eventbus.unknown")
