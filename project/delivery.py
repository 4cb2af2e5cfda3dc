"""The worker side: one Celery task per subscription, and the delivery policy in its hooks.

A delivery is one (event, handler): one Celery task with a task id derived from both. Its
state lives in Redis: a lease (``Keys.lease``), which is also its gate, holding the running
process' token and, once the delivery is settled, ``done`` or ``dead``; and a hash
(``Keys.delivery``: attempts, state, a redrive's budget, a committed block's outbox). The
policy lives in the task's own hooks, which Celery calls with explicit ids on every path,
hard time limits included:

- ``before_start``: skip a delivery that is done or dead; defer a copy whose lease another
  process holds (sent again for when the lease lapses, never run in parallel); count the
  attempt; give up on one that used all its attempts (a process killed each time). The
  router's first copy of a delivery is started with one ``SET NX`` of the lease and counts
  itself nowhere; a later copy counts that attempt (or presumes it, where it cannot tell
  whether it started, never giving up on a presumed attempt alone), and a failure counts it.
- ``on_success``: record it succeeded and mark it done in the gate, so every later copy is
  skipped. A first copy on a Redis broker does this at the end of ``run`` instead, and
  acknowledges its message in the same round trip, after the mark (:data:`ACKED_BY_POOL`).
- ``on_failure``: an exception, a soft or hard time limit: retry with backoff (sent again
  with the same task id), or after the last attempt mark it dead and publish
  ``module.error``. Data that its handler's contract refuses (``ContractViolation``) is
  dead at once: a retry would see the same data.

A worker process lost mid-task (OOM kill, segfault) has its message requeued by Celery
(``reject_on_worker_lost``); the next start counts that attempt. Recording is not done here:
the receivers in :mod:`project.signals` record what these hooks left in Redis.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import random
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject
from celery.worker.request import Request
from pydantic import BaseModel, Field

from project.bus import EventBus
from project.context import handling
from project.contracts import event as contract_event
from project.errors import ContractViolation, DeliveryExhausted
from project.event import AlreadyHandled, Delivery, Event
from project.keys import Keys
from project.kombu_fixes import ACK_HEADER, acknowledged_by_pool, take_leases_on_receipt
from project.lease import LEASE_AT_HEADER, LEASE_HEADER, keeper, new_token
from project.messages import FIRST_HEADER, UNCOUNTED_HEADER, UNCOUNTED_MAYBE, UNCOUNTED_STARTED
from project.observability import metrics
from project.observability.tracing import after_handling, handler_span
from project.records import BufferLengths, delivery_record
from project.redis_conn import LuaScript, send_many, send_one
from project.registry import Subscription

__all__ = [
    "ACKED_BY_POOL",
    "MODULE_ERROR",
    "DeliveryRequest",
    "DeliveryTask",
    "Event",
    "ModuleError",
    "backoff_s",
    "register_tasks",
    "route_task",
]

log = logging.getLogger("eventbus.delivery")

MODULE_ERROR = "module.error"

#: What a delivery task returns (Flower's "result") when its handler ran and its pool process
#: marked it done and acknowledged its message in one round trip: the worker's main process
#: then has nothing to send (see :class:`DeliveryRequest`). ``"ok"`` when the worker's main
#: process acknowledges it; ``"duplicate"`` when an earlier copy committed its effect.
ACKED_BY_POOL = "done"


@contract_event(MODULE_ERROR, version=1)
class ModuleError(BaseModel):
    """A delivery gave up: its handler failed on every attempt, or its data broke its contract."""

    handler: str = Field(description="The handler's task name.")
    queue: str
    event_id: str | None = Field(description="The event that was not handled.")
    event_type: str | None
    attempts: int = Field(ge=0, description="How many times the handler started.")
    error: str = Field(max_length=2000, description="The last error, as repr().")


# The lease key is also the delivery's gate: it holds the token of the process running it,
# 'retrying' between a failed attempt and its retry, and once the delivery is settled
# 'done' or 'dead' (for the state ttl). So a bare `SET lease token NX PX` takes a delivery
# that nothing runs, retries or settled: that is the whole start of a delivery's first copy
# (the router's send, see project.messages.FIRST_HEADER), which counts itself nowhere. Every
# other copy (redelivered by the broker, retried, deferred, redriven, sent again by the
# reconciler) takes the full start below, which counts its attempt in the delivery hash.
#
# KEYS: delivery hash, lease. ARGV: token, lease ms, max attempts, state ttl s (the done
# ttl plus the hard time limit: the done script leaves the TTL as it is), an attempt this
# copy counts that no hash holds (project.messages.UNCOUNTED_HEADER: '0' none; '2' one that
# started, a first copy's this copy found holding the lease; '1' one that may have: a
# redelivered first copy's, or what the reconciler found with no state: it counts, as
# 'presumed', but never stops a delivery before an attempt surely ran, as it may never have
# started: a message restored unstarted must still run a handler with no retries left). A
# redriven delivery (project.operations) carries its own limit in 'budget': its attempts so
# far plus a fresh max attempts, so attempts keep counting up across redrives. Returns
# {'skip', state, outbox} | {'busy', lease ms left, 1 if its holder is an uncounted first
# copy} | {'exhausted', attempts} | {'run', attempt}.
_START_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'outbox', 'attempts', 'budget', 'presumed')
local st = h[1]
local gate = redis.call('GET', KEYS[2])
if st == 'done' or st == 'dead' then
  if gate ~= st then redis.call('SET', KEYS[2], st, 'EX', ARGV[4]) end  -- settled by a commit or a redrive
  return {'skip', st, h[2] or ''}
end
if gate == 'done' or (gate == 'dead' and st ~= 'redriven') then
  return {'skip', gate, h[2] or ''}
end
if gate == ARGV[1] and h[3] and st == 'running' then  -- this start ran already, its reply lost
  return {'run', tonumber(h[3])}
end
if gate and gate ~= 'dead' and gate ~= 'retrying' and gate ~= ARGV[1] then  -- ARGV[1]: our SET NX landed
  local uncounted = 0
  if not h[3] then uncounted = 1 end
  return {'busy', redis.call('PTTL', KEYS[2]), uncounted}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local a, p = tonumber(h[3] or '0'), tonumber(h[5] or '0')
if not h[3] and ARGV[5] ~= '0' then
  a = 1
  if ARGV[5] == '1' then p = 1 end
end
if a >= tonumber(h[4] or ARGV[3]) and a > p then
  redis.call('HSET', KEYS[1], 'state', 'dead', 'attempts', a)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('SET', KEYS[2], 'dead', 'EX', ARGV[4])
  return {'exhausted', a}
end
a = a + 1
if p > 0 then
  redis.call('HSET', KEYS[1], 'attempts', a, 'state', 'running', 'presumed', p)
else
  redis.call('HSET', KEYS[1], 'attempts', a, 'state', 'running')
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'run', a}
"""

# Marks the delivery done and records it succeeded, in one round trip: the gate (the lease
# key) becomes 'done', and a delivery the full start counted also gets 'done' in its hash,
# which keeps the TTL the start script gave it (state ttl plus the hard time limit; only a
# hash that lapsed meanwhile, which HSET made anew, gets one). The mark goes first: a record
# Redis refuses (a log buffer of the wrong type) must not cost the mark that keeps every
# later copy from running the handler again. A first copy's success without the length to
# read is the same two commands in a plain pipeline (DeliveryTask.on_success).
# KEYS: delivery hash, log buffer, shed counters, lease. ARGV: state ttl s, event_id ('':
# nothing to record), handler, at, log buffer bound, full policy, attempts ('': read from
# the hash), read the log buffer's length ('1') or take it as under the bound ('0': see
# project.records.BufferLengths), mark the hash ('1'; '0': a first copy, which has none).
# An outbox left by an earlier copy is emptied. Returns the log buffer's length if it was
# read (after the record), else -1.
_DONE_LUA = """
redis.call('SET', KEYS[4], 'done', 'EX', ARGV[1])
if ARGV[9] == '1' and redis.call('HSET', KEYS[1], 'state', 'done', 'outbox', '') == 2 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
if ARGV[2] == '' then return -1 end
local len, shed = -1, false
if ARGV[8] == '1' then
  len = redis.call('XLEN', KEYS[2])
  shed = ARGV[6] == 'shed' and len >= tonumber(ARGV[5])
end
if shed then
  redis.call('HINCRBY', KEYS[3], 'd', 1)
  return len
end
local a = tonumber(ARGV[7])
if not a then a = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1') end
local record = {'d', tonumber(ARGV[4]), ARGV[2], ARGV[3], 'succeeded', a, cjson.null}
redis.call('XADD', KEYS[2], '*', 'r', cjson.encode(record))
if len >= 0 then len = len + 1 end
return len
"""

# KEYS: delivery hash, lease. ARGV: token ('' if unknown: a hard time limit, in the worker's
# main process), max attempts, state ttl s, final ('1': give up now), this host's name,
# attempts made if the hash counts none (a first copy counts its one attempt only here).
# An attempt whose lease lapsed (its worker was cut off from Redis) may fail long after
# another copy took over: it must not undo what that copy did, so a settled delivery, or
# one whose lease another process holds, is left alone ('settled', 'superseded'). A retry
# leaves 'retrying' in the gate, so no first copy can start meanwhile; giving up, 'dead'.
_FAIL_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'budget')
local a = tonumber(h[2] or '') or tonumber(ARGV[6]) or 0
local holder = redis.call('GET', KEYS[2])
if ARGV[4] ~= '1' then
  local now = h[1]
  if now == 'done' or now == 'dead' then
    if holder ~= now then redis.call('SET', KEYS[2], now, 'EX', ARGV[3]) end
    return {'settled', a}
  end
  if holder == 'done' or holder == 'dead' then return {'settled', a} end
  if holder and holder ~= ARGV[1] and holder ~= 'retrying' then
    if ARGV[1] ~= '' or string.sub(holder, 1, #ARGV[5] + 1) ~= ARGV[5] .. ':' then
      return {'superseded', a}
    end
  end
end
local st = 'retrying'
if ARGV[4] == '1' or a >= tonumber(h[3] or ARGV[2]) then st = 'dead' end
redis.call('HSET', KEYS[1], 'state', st, 'attempts', a)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if st == 'dead' then
  redis.call('SET', KEYS[2], 'dead', 'EX', ARGV[3])
elseif not holder or holder == ARGV[1] or holder == 'retrying' or ARGV[1] == '' then
  redis.call('SET', KEYS[2], 'retrying', 'EX', ARGV[3])
end
return {st, a}
"""

_START, _DONE, _FAIL = LuaScript(_START_LUA), LuaScript(_DONE_LUA), LuaScript(_FAIL_LUA)

_HOST = socket.gethostname()
_buffer_lengths = BufferLengths()  # of the log buffers this process records to
_loop: asyncio.AbstractEventLoop | None = None


def _run_coroutine(coro: Any) -> Any:
    # One loop per worker process, reused: async handlers may keep clients bound to it.
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def invoke(sub: Subscription, envelope: dict[str, Any], delivery: Delivery) -> None:
    """Call ``sub``'s handler with the event (typed by its contract), awaiting it if async.

    The one place a handler is called, by the worker and by the test kit (:mod:`project.testing`).
    Run it inside :func:`project.context.handling`, so what it publishes carries the chain.

    Raises:
        ContractViolation: the data does not fit the handler's ``Event[Model]``.
    """
    result = sub.handler(Event.for_handler(envelope, delivery, sub.model))
    if inspect.isawaitable(result):
        _run_coroutine(result)


def backoff_s(sub: Subscription, retries: int) -> float:
    """Exponential backoff with jitter: between half and all of base * 2**retries, capped."""
    ceiling = min(sub.backoff_max_s, sub.backoff_s * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event_type(args: Any) -> str:
    """The event type of a delivery task's arguments (``""`` if they hold no envelope)."""
    event = args[0] if args and isinstance(args[0], dict) else {}
    return str(event.get("event_type") or "")


def _since_published_s(event: Mapping[str, Any], started: float) -> float | None:
    """Seconds from the event's publish to ``started`` (a perf_counter reading), if known."""
    try:
        published = datetime.fromisoformat(event["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    return time.time() - (time.perf_counter() - started) - published


class DeliveryTask(Task):  # type: ignore[misc]
    """Runs one subscription's handler; made by :func:`register_tasks`, one per subscription."""

    subscription: Subscription
    bus: EventBus
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    typing = False
    # Attempts are counted per delivery in Redis (a lost process never reaches Celery's own
    # retry counter), so Celery's limit is off.
    max_retries = None
    Request = "project.delivery:DeliveryRequest"
    # (task id, attempt, first copy) of the delivery this process started last: what its
    # success record and its done mark need.
    _attempts: tuple[str, int, bool] = ("", 0, False)
    # (task id, kombu_fixes.ACK_HEADER) of the delivery this process started last, when it
    # may acknowledge that message itself.
    _ack: tuple[str, Any] | None = None

    @property
    def max_attempts(self) -> int:
        """How many times the handler may start for one event: ``max_retries + 1``."""
        return self.subscription.max_retries + 1

    def _scope_keys(self, args: Any) -> Keys:
        keys = self.bus.keys
        if keys.cluster:  # the delivery's keys are in its event's scope, beside its stream
            keys = keys.scoped(_event_type(args))
        return keys

    def _scripts_args(self, task_id: str, args: Any) -> tuple[Any, list[str]]:
        keys = self._scope_keys(args)
        return self.bus.sync_client(), [keys.delivery(task_id), keys.lease(task_id)]

    # -- the hooks -----------------------------------------------------------------------

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        s, request = self.bus.settings, self.request
        self._ack = None
        client, keys = self._scripts_args(task_id, args)
        lease_ms = int(s.delivery_lease_s * 1000)
        first = bool(getattr(request, FIRST_HEADER, None))
        redelivered = first and bool((request.delivery_info or {}).get("redelivered") or request.get("redelivered"))
        # An attempt before this copy that no hash counts: a redelivered first copy's, which
        # may have started, or what the header says (see _START_LUA).
        uncounted = UNCOUNTED_MAYBE if redelivered else int(getattr(request, UNCOUNTED_HEADER, None) or 0)
        try:
            # A first copy that nothing runs or settled is taken with a bare SET NX: no attempt
            # preceded it, so there is nothing to count (see _START_LUA). On a Redis broker the
            # worker's main process took it already, as it received the message (_lease_of).
            fresh = first and not redelivered
            held = getattr(request, LEASE_HEADER, None) if fresh else None  # none is written on RabbitMQ
            if held and not s.broker_is_amqp and keeper.adopt(client, keys[1], held, lease_ms, _at(request)):
                self._attempts = (task_id, 1, True)
                ack = getattr(request, ACK_HEADER, None)
                if isinstance(ack, list | tuple) and len(ack) == 3:
                    self._ack = (task_id, ack)
                return
            token = new_token()
            if fresh and send_one(client, "SET", keys[1], token, "NX", "PX", lease_ms):
                keeper.hold(client, keys[1], token, lease_ms)
                self._attempts = (task_id, 1, True)
                return
            # The run ends within its hard time limit, and its done mark must live the done ttl after.
            ttl_s = s.delivery_done_ttl_s + math.ceil(self.time_limit or s.delivery_time_limit_s)
            reply: Any = _START(client, keys, token, lease_ms, self.max_attempts, ttl_s, uncounted)
        except redis.RedisError as exc:
            # Put the message back rather than run without a lease or lose it.
            log.warning("%s[%s]: cannot reach Redis to start (%s); requeued", self.name, task_id, exc)
            raise Reject(exc, requeue=True) from exc
        verdict = _text(reply[0])
        if verdict == "run":
            keeper.hold(client, keys[1], token, lease_ms)
            self._attempts = (task_id, int(reply[1]), False)  # one task at a time per process
            return
        if verdict == "skip":
            outbox = _text(reply[2])
            if outbox:  # the effect committed, its events may not have gone out: send them
                from project.inbox import send_outbox

                send_outbox(self.bus, outbox)
                client.hdel(keys[0], "outbox")
            metrics.record_delivery(self.name, "skipped")
            log.info("%s[%s]: delivery already %s; this copy is skipped", self.name, task_id, _text(reply[1]))
            raise Ignore()
        if verdict == "busy":
            delay_s = max(int(reply[1]), 100) / 1000 + random.uniform(0, 0.5)
            log.info(
                "%s[%s]: another copy holds the lease; this copy is deferred by %.1fs", self.name, task_id, delay_s
            )
            # A first copy holds it, counted nowhere: the deferred copy counts its attempt (not
            # written to the hash here: the holder's Event.redis_transaction WATCHes it).
            # Otherwise it carries what this copy would have counted.
            carry = UNCOUNTED_STARTED if int(reply[2]) else uncounted
            options = {"headers": {UNCOUNTED_HEADER: carry}} if carry else {}
            self._send_later(args, kwargs, task_id, delay_s, **options)
            metrics.record_delivery(self.name, "deferred")
            raise Ignore()
        raise DeliveryExhausted(
            f"{self.name}: delivery {task_id} used all its {self.max_attempts} attempts without finishing: "
            "its process was lost (killed, out of memory) each time"
        )

    def run(self, event: dict[str, Any]) -> str:
        """Run the handler; :data:`ACKED_BY_POOL` or ``"ok"``, ``"duplicate"`` if an earlier copy committed its effect.

        A word, not a dict: Celery writes the ``repr`` of every return value into the task's
        success event (Flower's "result"), and a dict's cost some 20 µs a run. The task's
        arguments already name the event.
        """
        sub, task_id = self.subscription, self.request.id
        started = time.perf_counter()
        try:
            with (
                handling(event, sub.module, delivery_id=task_id),
                handler_span(event, self.name, sub.queue, ignore=(AlreadyHandled,)),
            ):
                invoke(sub, event, Delivery(self.bus, task_id, self.name))
        except AlreadyHandled:
            log.info("%s[%s]: its effect was committed by an earlier copy; skipped", self.name, task_id)
            return "duplicate"
        finally:
            if metrics.enabled() is not None:
                metrics.record_handler_run(self.name, time.perf_counter() - started, _since_published_s(event, started))
        return self._settle(task_id, event)

    def _settle(self, task_id: str, event: Mapping[str, Any]) -> str:
        """Mark a first copy done, record it, and acknowledge its message, in one round trip.

        :data:`ACKED_BY_POOL` if it did. ``"ok"`` if this copy may not acknowledge its own
        message (it is not a first copy whose lease the worker's main process took on
        receipt, its header names other keys than this app's broker uses, or the record needs
        the done script's checks), or if anything failed on the way (Redis, or a soft time
        limit that struck after the handler returned): then ``on_success`` marks it and the
        main process acknowledges it, as for any other copy.
        """
        ack, self._ack = self._ack, None
        if ack is None or ack[0] != task_id:  # set by before_start, with _attempts, for this delivery only
            return "ok"
        tag, unacked_index, unacked = ack[1]
        s, keys = self.bus.settings, self._scope_keys((event,))
        event_id = str(event.get("event_id") or "")
        if not event_id or self._reads_length(keys, event_id) or (unacked_index, unacked) != _unacked_keys(self.app):
            return "ok"
        try:
            lease = keys.lease(task_id)
            keeper.release(lease)  # the done mark takes the lease key's place
            record = delivery_record(event_id, self.name, "succeeded", self._attempts[1])
            # In this order on one connection: Redis removes the message after the mark. The
            # hash first: an entry left in the index alone is cleared by kombu's restore.
            send_many(
                self.bus.sync_client(),
                *_done_commands(lease, keys.log_buffer, record, s.delivery_done_ttl_s),
                ("HDEL", unacked, tag),
                ("ZREM", unacked_index, tag),
            )
        except Exception as exc:  # as Celery treats an error in on_success, where this was done before
            log.warning(
                "%s[%s]: could not mark done and acknowledge in one round trip (%r); on_success marks it and "
                "the worker acknowledges it",
                self.name, task_id, exc,
            )  # fmt: skip
            return "ok"
        return ACKED_BY_POOL

    def _reads_length(self, keys: Keys, event_id: str) -> bool:
        """Whether this success record reads the log buffer's length (the done script's job)."""
        s = self.bus.settings
        return event_id != "" and s.log_buffer_full_policy == "shed" and _buffer_lengths.due(keys.log_buffer)

    def on_success(self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        if retval == ACKED_BY_POOL:  # marked, recorded and acknowledged at the end of run
            metrics.record_delivery(self.name, "succeeded")
            return
        s, keys = self.bus.settings, self._scope_keys(args)
        lease = keys.lease(task_id)
        keeper.release(lease)  # the done mark takes the lease key's place
        attempt_of, attempts, first = self._attempts
        ours = attempt_of == task_id
        event = args[0] if args and isinstance(args[0], dict) else {}
        event_id = str(event.get("event_id") or "")
        client = self.bus.sync_client()
        read = self._reads_length(keys, event_id)
        if ours and first and event_id and not read:
            # A first copy: no hash to mark and no length to read, so no script either.
            record = delivery_record(event_id, self.name, "succeeded", attempts)
            send_many(client, *_done_commands(lease, keys.log_buffer, record, s.delivery_done_ttl_s))
        else:
            length = _DONE(
                client,
                [keys.delivery(task_id), keys.log_buffer, keys.log_shed, lease],
                s.delivery_done_ttl_s,
                event_id,
                self.name,
                f"{time.time():.6f}",
                s.log_buffer_max_records,
                s.log_buffer_full_policy,
                attempts if ours else "",
                "1" if read else "0",
                "0" if ours and first else "1",
            )
            if read:
                _buffer_lengths.read(keys.log_buffer, int(length), s.log_buffer_max_records)
        duplicate = retval == "duplicate"
        metrics.record_delivery(self.name, "skipped" if duplicate else "succeeded")

    def _send_later(self, args: Any, kwargs: Any, task_id: str, delay_s: float, **options: Any) -> None:
        """Send this delivery again (same task id) to run in ``delay_s`` seconds."""
        s = self.bus.settings
        if s.broker_is_amqp and s.broker_quorum_queues:
            # On quorum queues Celery delays through RabbitMQ's delayed-delivery exchanges, in
            # whole seconds; it refuses a countdown that rounds down to 0.
            delay_s = float(math.ceil(delay_s))
        self.apply_async(args, kwargs, task_id=task_id, countdown=delay_s, **options)

    def on_failure(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], einfo: Any
    ) -> None:
        sub = self.subscription
        client, keys = self._scripts_args(task_id, args)
        # In the worker's main process (a hard time limit) nothing is held: the killed
        # child's lease lapses by itself, and the retry below is deferred until it has.
        token = keeper.release(keys[1]) or ""
        # No retry can help these: attempts used up, or data its contract refuses.
        final = isinstance(exc, DeliveryExhausted | ContractViolation)
        try:
            attempt_of, attempts, _ = self._attempts
            # A run that failed started: 1 at least, if this process did not start it (a hard time limit).
            made = attempts if attempt_of == task_id else 1
            reply: Any = _FAIL(
                client, keys, token, self.max_attempts, self.bus.settings.delivery_done_ttl_s, int(final), _HOST, made
            )
        except redis.RedisError:
            # The message is not acknowledged either (same Redis): it comes back after the
            # visibility timeout and this attempt is counted again then.
            log.exception("%s[%s]: cannot record the failed attempt", self.name, task_id)
            return
        state, attempts = _text(reply[0]), int(reply[1])
        if state in ("settled", "superseded"):
            log.warning(
                "%s[%s]: a stale attempt failed (%r) after another copy %s the delivery; ignored",
                self.name, task_id, exc, "finished" if state == "settled" else "took over",
            )  # fmt: skip
            return
        event = args[0] if args and isinstance(args[0], dict) else {}
        if state == "retrying":
            delay_s = backoff_s(sub, max(attempts - 1, 0))
            log.warning(
                "%s[%s]: attempt %d of %d failed (%r); retrying in %.1fs",
                self.name, task_id, attempts, self.max_attempts, exc, delay_s,
            )  # fmt: skip
            self._send_later(args, kwargs, task_id, delay_s, retries=attempts)
            metrics.record_delivery(self.name, "retried")
            return
        metrics.record_delivery(self.name, "dead")
        self._report_dead(task_id, event, exc, attempts)

    def _report_dead(self, task_id: str, event: Mapping[str, Any], exc: BaseException, attempts: int) -> None:
        sub = self.subscription
        log.error("%s: gave up on event %s after %d attempts: %r", sub.name, event.get("event_id"), attempts, exc)
        if event.get("event_type") == MODULE_ERROR or "event_id" not in event:
            return  # a failing module.error handler must not feed itself
        # The report is caused by the failed event but starts its hop count afresh: a chain
        # stopped by the hop limit must still be able to report it. Its id is derived from
        # the delivery, so a report sent twice (a crash right after it) is stored once.
        try:
            with (
                handling({**event, "hops": 0}, sub.module, delivery_id=f"{task_id}/{MODULE_ERROR}"),
                after_handling(event),  # the report joins the failed event's trace
            ):
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


_ACKED_REPR = repr(ACKED_BY_POOL)  # how a result reaches the worker's main process (Celery's saferepr)


def _done_commands(lease: str, log_buffer: str, record: str, ttl_s: int) -> tuple[tuple[Any, ...], ...]:
    """A first copy's done mark (its lease key, the delivery's gate) and its success record."""
    return ("SET", lease, "done", "EX", ttl_s), ("XADD", log_buffer, "*", "r", record)


@functools.cache  # per app: its broker's options are set before its worker starts
def _unacked_keys(app: Celery) -> tuple[str, str]:
    """kombu's unacked index and hash keys for ``app``'s Redis broker, as they are in Redis."""
    options = app.conf.broker_transport_options or {}
    prefix = options.get("global_keyprefix") or ""
    return prefix + options.get("unacked_index_key", "unacked_index"), prefix + options.get("unacked_key", "unacked")


class DeliveryRequest(Request):  # type: ignore[misc]
    """A delivery task's request in the worker's main process: Celery's, except that the
    message of a task that returned :data:`ACKED_BY_POOL` is acknowledged in memory only;
    its pool process removed it from the broker already
    (:func:`project.kombu_fixes.acknowledged_by_pool`).

    Celery makes a subclass of it per task, with its own ``on_success``
    (``celery.worker.request.create_request_cls``); each gets the same wrapping.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        made = cls.__dict__.get("on_success")
        if made is not None:
            cls.on_success = _noting_acked_by_pool(made)  # type: ignore[method-assign]


def _noting_acked_by_pool(on_success: Any) -> Any:
    @functools.wraps(on_success)
    def wrapped(self: Any, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        failed, retval = failed__retval__runtime[0], failed__retval__runtime[1]
        if not failed and retval == _ACKED_REPR:
            acknowledged_by_pool(self.message)
        return on_success(self, failed__retval__runtime, **kwargs)

    return wrapped


# Used only if a Celery no longer makes its own on_success per task (create_request_cls).
DeliveryRequest.on_success = _noting_acked_by_pool(Request.on_success)  # type: ignore[method-assign]


def _at(request: Any) -> float:
    """When the lease in the request's headers was taken (``time.monotonic()``); 0 if unsaid."""
    try:
        return float(getattr(request, LEASE_AT_HEADER, 0.0))
    except (TypeError, ValueError):
        return 0.0


def register_tasks(app: Celery, bus: EventBus) -> None:
    """Make one Celery task per subscription in ``bus``, named after its handler (idempotent)."""
    for sub in bus.registry:
        if sub.name in app.tasks:
            continue
        hard_s = sub.time_limit_s or bus.settings.delivery_time_limit_s
        task_cls = type(
            f"Delivery[{sub.name}]",
            (DeliveryTask,),
            {
                "name": sub.name,
                "subscription": sub,
                "bus": bus,
                "time_limit": hard_s,
                # Raised inside the handler first, so it can clean up; the hard limit kills.
                "soft_time_limit": sub.soft_time_limit_s or hard_s * 0.9,
                "__module__": __name__,
            },
        )
        app.register_task(task_cls())
    take_leases_on_receipt(_lease_of(bus))


def _lease_of(bus: EventBus) -> Any:
    """What the worker's main process takes on receipt (:func:`take_leases_on_receipt`): the
    lease of a delivery's first copy that no broker redelivered, where the Redis that holds
    Celery's queues holds the leases too (on a Redis broker it is the event Redis; a Redis
    Cluster's keys live elsewhere)."""
    lease_ms = int(bus.settings.delivery_lease_s * 1000)
    # On RabbitMQ no message passes kombu's Redis QoS; a Redis Cluster's keys are not in the
    # Redis that holds Celery's queues (and the settings refuse Celery's queues on one).
    never = bus.settings.broker_is_amqp or bus.keys.cluster

    def lease_of(message: Any) -> tuple[str, str, int] | None:
        headers = message.headers
        if never or not headers.get(FIRST_HEADER) or headers.get("redelivered"):
            return None
        task_id = headers.get("id")
        if type(task_id) is not str or (message.delivery_info or {}).get("redelivered"):
            return None
        return bus.keys.lease(task_id), new_token(), lease_ms

    return lease_of


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Celery router (``task_routes``): a delivery task goes to its subscription's queue."""
    sub = getattr(task, "subscription", None)
    if isinstance(sub, Subscription):
        return {"queue": sub.queue}
    return None
