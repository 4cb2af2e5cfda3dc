"""The router: reads the event stream through a consumer group and dispatches Celery tasks.

For each batch it validates every entry, matches it against all subscriptions, builds one
Celery message per match and then runs a Lua script that, atomically: checks which entries
are still pending for this consumer (one XPENDING over their range), and for each of those
drops it if its event_id was already published as another entry, LPUSHes its messages onto
the Celery queues (one LPUSH per queue) and appends its record to the log buffer (or the
entry to the dead-letter stream); then it XACKs the entries it handled, in one call, also
when an entry failed halfway through the batch. So an entry is dispatched once even when
routers crash (its messages were either all sent and the entry acknowledged, or neither) or
when two routers race for an entry (the one that no longer owns it sends nothing).

With Celery's queues on RabbitMQ (``CELERY_BROKER_URL`` an AMQP URL), the script cannot send
the tasks. The router then publishes them first, on one held channel, waits for RabbitMQ's
publisher confirms, and runs the same script without the pushes to acknowledge and record
(project.broker). A crash between the two sends the entries' tasks again, and the workers'
done markers run each handler's effect once.

A batch is cut into script calls of at most ``ROUTER_BATCH_MAX_BYTES``; an entry Redis keeps
refusing is dead-lettered on its own rather than holding up the ones after it. Every
``ROUTER_TRIM_INTERVAL_S`` the stream is trimmed up to the oldest entry a consumer group
still needs.

On a Redis Cluster each scope has its own stream (``project.keys``): the router runs this same
loop for each scope's stream, in a thread per scope (``project.scopes``), with Celery's queues
on RabbitMQ. Within a scope, entries are dispatched in stream order; across scopes there is
no order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from project.broker import CONNECTION_ERRORS, AmqpSender, BrokerError, sender_for
from project.consumer import ConsumerConfig, GroupConsumer
from project.envelope import decode_envelope
from project.errors import MalformedEnvelope
from project.keys import PUBLISHED_FIELD, ROUTER_GROUP
from project.messages import TaskMessage, delivery_task_id, task_message
from project.observability import metrics
from project.records import BufferLengths, event_record
from project.redis_conn import keys_for, redis_client, require_amqp_on_cluster
from project.registry import Registry
from project.scopes import ScopeLoops, literal_scopes
from project.settings import Settings

__all__ = ["Router", "RouterStats"]

log = logging.getLogger("eventbus.router")

_DEAD_LETTER_MAXLEN = 100_000
_PUBLISHED = PUBLISHED_FIELD.encode()
_RAW_KEEP_BYTES = 8 * 1024
# A script call failing this many times in a row is retried one entry at a time.
_MAX_CALL_FAILURES = 3
_SHED_LOG_INTERVAL_S = 10.0
# Redis errors that say nothing about the entries (memory, failover, scripts, ACLs, or a
# key of ours holding the wrong type): the batch waits for them to pass, never dead-lettered.
_ENVIRONMENTAL_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoScriptError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
_ENVIRONMENTAL_CODES = ("OOM", "READONLY", "BUSY", "NOREPLICAS", "MISCONF", "EVENTBUS-KEYTYPE")
# RabbitMQ: at most this many confirmed but unacknowledged entry ids are remembered.
_CONFIRMED_KEEP = 100_000
_ARG_OVERHEAD = 16  # bytes of RESP framing per argument, roughly

# Lua: `id_parts(id)` and `id_less(x, y)` for stream ids. Their parts are compared as numbers
# written in decimal: they can exceed a Lua number's 2^53.
_ID_LUA = """
local function id_parts(id) return string.match(id, '^(%d+)-(%d+)$') end
local function num_less(x, y)
  if #x ~= #y then return #x < #y end
  return x < y
end
local function id_less(x, y)
  local xm, xs = id_parts(x)
  local ym, ys = id_parts(y)
  if xm ~= ym then return num_less(xm, ym) end
  return num_less(xs, ys)
end
"""

# Lua: `pending_of(stream, group, consumer, ids)`, a function telling whether an id of `ids`
# is still pending for this consumer. One XPENDING over their range answers for all of them
# (one per id if that range holds more of the consumer's entries than it listed).
_PENDING_LUA = (
    _ID_LUA
    + """
local function pending_of(stream, group, consumer, ids)
  local low, high = ids[1], ids[1]
  for _, id in ipairs(ids) do
    if id_less(id, low) then low = id end
    if id_less(high, id) then high = id end
  end
  local mine, limit = {}, #ids + 100
  if #ids > 0 then
    local listed = redis.call('XPENDING', stream, group, low, high, limit, consumer)
    for _, p in ipairs(listed) do mine[p[1]] = true end
    if #listed >= limit then mine = nil end
  end
  return function(id)
    if mine then return mine[id] == true end
    return #redis.call('XPENDING', stream, group, id, id, 1, consumer) > 0
  end
end
"""
)

# KEYS: stream, log buffer, dead-letter, log-shed counters, then the Celery queue lists
#   (ARGV[7] of them), then the dedup keys of the entries' event_ids.
# ARGV: group, consumer, dead-letter maxlen, log buffer bound, read the log buffer's length
#   and shed at the bound ('1'; '0': policy keep, or read under the bound less than a second
#   ago, see project.records.BufferLengths), dedup window (s), number of queue keys, then
#   per entry:
#   id, kind ('d' dispatch | 'x' dead-letter), a, b, dedup KEYS index (0: none), n, then n
#   pairs (KEYS index, message); for 'd': a = log record; for 'x': a = reason, b = raw entry.
# Returns {entries handled, skipped, duplicates, records shed, tasks sent, dead-lettered,
#   {"<key> (<type>)", ...} of queue keys that are not lists, {ids of the 'd' entries not
#   dispatched here (skipped, duplicate, or dead-lettered for a bad queue key)}, the log
#   buffer's length (-1: not read)}.
_DISPATCH_LUA = (
    _PENDING_LUA
    + """
local stream, logbuf, dlq, shed_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer, dlq_maxlen = ARGV[1], ARGV[2], ARGV[3]
local log_max, shed, window = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6]
-- A Redis script is not rolled back when a command fails, so no entry may be left half
-- written: each key an entry writes is known to hold the right type before its first write,
-- or its writes are taken back. On the common path that costs no command of its own: an
-- entry's first push checks its queue key (refused, it leaves nothing behind), and the first
-- record checks the log buffer (refused, the entry's pushes are popped back off their
-- lists; XLEN checks it first when the length is read). TYPE is asked of another queue key
-- of the same entry, and of the dead-letter stream and the shed counters when they are
-- about to be written, once per call.
local good = {}
local function keytype(k, want)
  if good[k] then return nil end
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t == want or t == 'none' then good[k] = true return nil end
  return t
end
local function keytype_error(k, want, t)
  return redis.error_reply('EVENTBUS-KEYTYPE ' .. KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want)
end
local function wrongtype(reply)
  return type(reply) == 'table' and reply.err and string.find(reply.err, 'WRONGTYPE', 1, true)
end
local loglen = -1
if shed then
  loglen = redis.pcall('XLEN', logbuf)
  if type(loglen) == 'table' then
    if wrongtype(loglen) then return keytype_error(2, 'stream', redis.call('TYPE', logbuf)['ok']) end
    return loglen
  end
  good[2] = true
end
-- LPUSH key m1 m2 ... (in chunks, as Lua's unpack is bounded); `first` uses pcall.
local function push(q, msgs, first)
  for c = 1, #msgs, 1000 do
    local call = (first and c == 1) and redis.pcall or redis.call
    local r = call('LPUSH', KEYS[q], unpack(msgs, c, math.min(c + 999, #msgs)))
    if type(r) == 'table' then return r end
  end
  good[q] = true
  return nil
end
local done, skipped, dups, shed_n, sent, dead = 0, 0, 0, 0, 0, 0
local bad, badlist, passed = {}, {}, {}
local function mark_bad(q, t)
  bad[q] = t
  badlist[#badlist + 1] = KEYS[q] .. ' (' .. t .. ')'
end
local ids, j = {}, 8
while j <= #ARGV do
  ids[#ids + 1] = ARGV[j]
  j = j + 6 + 2 * tonumber(ARGV[j + 5])
end
local pending = pending_of(stream, group, consumer, ids)
-- The entries handled are acknowledged together at the end, also when one fails halfway.
local acked = {}
local function handle()
  local i = 8
  while i <= #ARGV do
    local id, kind, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local pub, n = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
    local m = i + 6
    i = m + 2 * n
    if not pending(id) then
      skipped = skipped + 1
      passed[#passed + 1] = id
    else
      local prev = false
      if pub > 0 then prev = redis.call('GET', KEYS[pub]) end
      if prev and prev ~= id then
        dups = dups + 1  -- this event_id was published as another entry: already dispatched
        passed[#passed + 1] = id
      else
        local badq
        local order, msgs = {}, {}  -- the entry's queue keys in first-use order, their messages
        if kind == 'd' then
          for j = 0, n - 1 do
            local q = tonumber(ARGV[m + 2 * j])
            if not msgs[q] then order[#order + 1] = q msgs[q] = {} end
            local list = msgs[q]
            list[#list + 1] = ARGV[m + 2 * j + 1]
          end
          for o = 1, #order do
            local q = order[o]
            if bad[q] then badq = q break end
            if o > 1 then
              local t = keytype(q, 'list')
              if t then mark_bad(q, t) badq = q break end
            end
          end
        end
        local sheds = kind == 'd' and shed and loglen >= log_max
        if sheds and not badq then
          local t = keytype(4, 'hash')
          if t then return keytype_error(4, 'hash', t) end
        end
        if kind == 'd' and not badq and #order > 0 then
          local r = push(order[1], msgs[order[1]], not good[order[1]])
          if r then
            if not wrongtype(r) then return r end
            badq = order[1]
            mark_bad(badq, redis.call('TYPE', KEYS[badq])['ok'])
          else
            for o = 2, #order do push(order[o], msgs[order[o]], false) end
          end
        end
        if badq then
          kind, a = 'x', 'Celery queue key ' .. KEYS[badq] .. ' holds a ' .. bad[badq] .. ', not a list'
          passed[#passed + 1] = id
          local e = redis.call('XRANGE', stream, id, id)[1]
          local raw = {}
          if e then
            for f = 1, #e[2], 2 do raw[e[2][f]] = string.sub(e[2][f + 1], 1, 8192) end
          end
          b = cjson.encode(raw)
        end
        if kind == 'x' then
          local t = keytype(3, 'stream')
          if t then return keytype_error(3, 'stream', t) end
          redis.call('XADD', dlq, 'MAXLEN', '~', dlq_maxlen, '*', 'id', id, 'reason', a, 'raw', b)
          dead = dead + 1
        else
          sent = sent + n
          if sheds then
            redis.call('HINCRBY', shed_key, 'e', 1)
            shed_n = shed_n + 1
          else
            local r = (good[2] and redis.call or redis.pcall)('XADD', logbuf, '*', 'r', a)
            if type(r) == 'table' then  -- refused: take the entry's tasks back, it stays pending
              for o = 1, #order do redis.call('LPOP', KEYS[order[o]], #msgs[order[o]]) end
              if wrongtype(r) then return keytype_error(2, 'stream', redis.call('TYPE', logbuf)['ok']) end
              return r
            end
            good[2] = true
            if loglen >= 0 then loglen = loglen + 1 end
          end
          if pub > 0 and not prev then redis.call('SET', KEYS[pub], id, 'EX', window) end
        end
      end
      acked[#acked + 1] = id
      done = done + 1
    end
  end
  return nil
end
local ok, failed = pcall(handle)
for c = 1, #acked, 1000 do
  redis.call('XACK', stream, group, unpack(acked, c, math.min(c + 999, #acked)))
end
if not ok then
  if type(failed) == 'table' then return failed end
  return redis.error_reply(tostring(failed))
end
if failed then return failed end  -- a key of the wrong type, found before the entry wrote
return {done, skipped, dups, shed_n, sent, dead, badlist, passed, loglen}
"""
)

# RabbitMQ broker, before publishing: which entries may still be sent by this router.
# KEYS: stream, then the dedup keys of the entries' event_ids. ARGV: group, consumer, then per
# entry: id, dedup KEYS index (0: none). Returns the ids still pending for this consumer whose
# event_id was not published as another entry (the same checks the dispatch script makes).
_OWNED_LUA = (
    _PENDING_LUA
    + """
local ids = {}
for i = 3, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
local pending = pending_of(KEYS[1], ARGV[1], ARGV[2], ids)
local out = {}
for i = 3, #ARGV, 2 do
  local id, pub = ARGV[i], tonumber(ARGV[i + 1])
  if pending(id) then
    local prev = false
    if pub > 0 then prev = redis.call('GET', KEYS[pub]) end
    if not prev or prev == id then out[#out + 1] = id end
  end
end
return out
"""
)

# Trims the stream up to the oldest entry some consumer group still needs: its oldest
# pending entry, or else the one after the last it read. One script, so a group created
# (or an entry read) meanwhile cannot slip between computing the bound and trimming.
# KEYS: stream. ARGV: the router group. Returns the number of entries trimmed.
_TRIM_LUA = (
    _ID_LUA
    + """
local stream, router = KEYS[1], ARGV[1]
if redis.call('EXISTS', stream) == 0 then return 0 end
local function incr(s)
  local k = #s
  while k > 0 and string.sub(s, k, k) == '9' do k = k - 1 end
  if k == 0 then return '1' .. string.rep('0', #s) end
  return string.sub(s, 1, k - 1) .. string.char(string.byte(s, k) + 1) .. string.rep('0', #s - k)
end
local low, seen_router = nil, false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for f = 1, #g, 2 do info[g[f]] = g[f + 1] end
  if info['name'] == router then seen_router = true end
  local need
  if tonumber(info['pending']) > 0 then
    need = redis.call('XPENDING', stream, info['name'])[2]
  else
    local ms, seq = id_parts(info['last-delivered-id'])
    need = ms .. '-' .. incr(seq)
  end
  if low == nil or id_less(need, low) then low = need end
end
if not seen_router then return 0 end  -- the routers have not read anything yet
return redis.call('XTRIM', stream, 'MINID', low)
"""
)


@dataclass
class RouterStats:
    """Counters since the router started."""

    entries: int = 0
    dispatched_tasks: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    duplicates: int = 0
    shed: int = 0
    trimmed: int = 0
    errors: int = 0


@dataclass(slots=True)
class _Item:
    """One stream entry, ready for the dispatch script."""

    eid: str
    kind: str  # 'd' dispatch | 'x' dead-letter
    a: str  # the log record, or the reason
    b: str  # the raw entry, for a dead letter
    event_id: str | None
    # Redis broker: (queue, message as kombu's Redis transport stores it), pushed by the script.
    messages: list[tuple[str, str]] = field(default_factory=list)
    fields: Any = None
    event_type: str = ""
    # RabbitMQ broker: the tasks, published (and confirmed) before the script runs.
    tasks: list[TaskMessage] = field(default_factory=list)
    # Written by the publish script, which keeps an event_id to one entry in the dedup
    # window, and read well within it: no dedup key to look at (see Router._unique).
    unique: bool = False

    def queues(self) -> list[str]:
        return [q for q, _ in self.messages] or [t.queue for t in self.tasks]

    def size(self) -> int:
        strings = [self.eid, self.a, self.b, *(m for _, m in self.messages)]
        return sum(_nbytes(s) + _ARG_OVERHEAD for s in strings) + 4 * _ARG_OVERHEAD * (1 + len(self.messages))


def _pack(items: Sequence[_Item], max_bytes: int) -> Iterator[list[_Item]]:
    """Cut ``items`` into runs of at most ``max_bytes`` (an item larger than that goes alone)."""
    run: list[_Item] = []
    size = 0
    for item in items:
        n = item.size()
        if run and size + n > max_bytes:
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


class Router:
    """Dispatches the events of one environment to the subscriptions in ``registry``."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        consumer: str | None = None,
        client: redis.Redis | None = None,
        scope: str | None = None,
    ) -> None:
        """A router of ``settings``' environment.

        On a Redis Cluster, ``scope`` makes it the router of that scope's stream; without one,
        :meth:`run` runs a router per scope (``project.scopes``).

        Raises:
            ConfigurationError: a Redis Cluster with Celery's queues not on RabbitMQ.
            redis.RedisError: Redis could not be asked whether it is a cluster.
        """
        self.settings = settings
        self.registry = registry
        self.scope = scope
        base = keys_for(settings)
        if base.cluster:
            require_amqp_on_cluster(settings)
        self.keys = base if scope is None else base.of_scope(scope)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.client = client or redis_client(settings)
        self.stats = RouterStats()
        # Redis' clock minus this host's, in ms (see _server_ms), and when to ask Redis again.
        self._clock_offset_ms = 0.0
        self._clock_due = 0.0
        self._script = self.client.register_script(_DISPATCH_LUA)
        self._owned_script = self.client.register_script(_OWNED_LUA)
        # On a cluster without a scope, this router only runs one router per scope (run).
        self.scopes: ScopeLoops | None = None
        if self.keys.cluster and scope is None:
            self.scopes = ScopeLoops(
                "router",
                self.client,
                self.keys,
                lambda sc: Router(settings, registry, consumer=self.consumer, client=self.client, scope=sc),
                refresh_s=settings.scope_refresh_s,
                seeds=literal_scopes(p for sub in registry for p in sub.patterns),
            )
        # Celery's queues on RabbitMQ: tasks are published with confirms before the script.
        self.sender: AmqpSender | None = sender_for(settings) if self.scopes is None else None
        self._confirmed: set[str] = set()  # entry ids sent and confirmed, not yet acknowledged
        self._trim_script = self.client.register_script(_TRIM_LUA)
        self._call_failures = 0
        self._shed_unlogged = 0
        self._next_shed_log_at = 0.0
        self.buffer_lengths = BufferLengths()

        self.loop = GroupConsumer(
            self.client,
            ConsumerConfig(
                what="router",
                stream=self.keys.stream,
                group=ROUTER_GROUP,
                consumer=self.consumer,
                batch_size=settings.router_batch_size,
                block_ms=settings.router_block_ms,
                claim_idle_ms=settings.router_claim_idle_ms,
                backoff_max_s=5.0,
                chores=((settings.router_trim_interval_s, self.trim),),
            ),
            self.dispatch,
            is_outage=lambda exc: isinstance(exc, (redis.RedisError, BrokerError, *CONNECTION_ERRORS)),
        )

    def run(self, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set. Survives Redis outages and any bad entry."""
        if self.scopes is not None:
            self.scopes.run(stop)
            self.stats = self.total_stats()
            return
        try:
            self.loop.run(stop)
        finally:
            self.stats.errors = self.loop.errors
            if self.sender is not None:
                self.sender.close()

    def total_stats(self) -> RouterStats:
        """This router's counters, summed over its scopes' routers on a cluster."""
        if self.scopes is None:
            return self.stats
        total = RouterStats()
        for router in self.scopes.loops.values():
            st = router.total_stats() if isinstance(router, Router) else RouterStats()
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(st, name))
        return total

    def trim(self) -> int:
        """Trim the stream up to the oldest entry any consumer group still needs; return how many went."""
        trimmed = int(self._trim_script(keys=[self.keys.stream], args=[ROUTER_GROUP]))
        self.stats.trimmed += trimmed
        return trimmed

    def dispatch(self, entries: Sequence[tuple[Any, Any]]) -> None:
        """Send the tasks of ``entries`` (read by this consumer) and acknowledge them.

        Each task is its delivery's first copy (``FIRST_HEADER``: the worker starts it with a
        bare SET NX), except on RabbitMQ for entries read again or taken over: their tasks may
        have been published already by a send whose acknowledgement did not follow, and a
        copy sent again must be counted as any other (see project.delivery). On Redis the
        script that pushes the tasks also acknowledges the entries, so no entry is sent twice.
        """
        first = self.sender is None or self.loop.fresh
        items = [self._item(_text(entry_id), fields, first) for entry_id, fields in entries]
        for run in _pack(items, self.settings.router_batch_max_bytes):
            self._send(run)

    def _item(self, eid: str, fields: Any, first: bool = True) -> _Item:
        try:
            return self._prepare(eid, fields, first)
        except MalformedEnvelope as exc:
            log.warning("router: entry %s dead-lettered: %s", eid, exc)
            return _Item(eid, "x", str(exc)[:2000], _raw(fields), None, fields=fields)
        except Exception as exc:  # a bug must not stop the router: set the entry aside
            log.exception("router: entry %s dead-lettered by an internal error", eid)
            return _Item(eid, "x", f"internal error: {exc!r}"[:2000], _raw(fields), None, fields=fields)

    def _send(self, items: list[_Item]) -> None:
        """Run the script on ``items``; after repeated failures, one entry at a time."""
        try:
            self._call(items)
        except redis.ResponseError as exc:
            if _environmental(exc):
                log.error("router: Redis refused the dispatch of %d entries: %s", len(items), exc)
                raise
            self._call_failures += 1
            if self._call_failures < _MAX_CALL_FAILURES:
                raise  # the entries stay pending and are read again after a backoff
            log.error(
                "router: the dispatch of %d entries failed %d times in a row (%s); sending them one at a time",
                len(items),
                self._call_failures,
                exc,
            )
            self._one_at_a_time(items)
        self._call_failures = 0

    def _one_at_a_time(self, items: list[_Item]) -> None:
        # Entries already handled (before the failing one) are no longer pending for us, so
        # the script skips them: nothing is sent twice.
        for item in items:
            try:
                self._call([item])
            except redis.ResponseError as exc:
                if _environmental(exc):
                    raise
                reason = f"Redis refused its dispatch: {exc}"[:2000]
                log.error("router: entry %s dead-lettered: %s", item.eid, reason)
                self._call([_Item(item.eid, "x", reason, _raw(item.fields), None, fields=item.fields)])

    def _publish(self, items: list[_Item]) -> None:
        """RabbitMQ: publish the tasks of the entries still ours, and wait for RabbitMQ's confirms.

        The script that acknowledges them runs after this returns. Should this router die in
        between, the router that takes the entries over sends them again (same task ids).
        """
        assert self.sender is not None
        candidates = [item for item in items if item.kind == "d" and item.tasks]
        if not candidates:
            return
        keys: list[str] = [self.keys.stream]
        argv: list[Any] = [ROUTER_GROUP, self.consumer]
        for item in candidates:
            pub = 0
            if item.event_id is not None and not item.unique:
                keys.append(self.keys.published(item.event_id))
                pub = len(keys)
            argv += [item.eid, pub]
        owned = {_text(eid) for eid in self._owned_script(keys=keys, args=argv)}
        # Entries whose tasks this router already had confirmed, but which Redis then refused
        # to acknowledge, are not sent again while it retries: only by a router taking over.
        fresh = [item for item in candidates if item.eid in owned and item.eid not in self._confirmed]
        self.sender.send([task for item in fresh for task in item.tasks])
        if len(self._confirmed) > _CONFIRMED_KEEP:  # entries another router took over never return here
            self._confirmed.clear()
        self._confirmed.update(item.eid for item in fresh)

    def _call(self, items: list[_Item]) -> None:
        s, keys = self.settings, self.keys
        if self.sender is not None:
            self._publish(items)
        queue_keys: dict[str, int] = {}
        for item in items:
            for queue, _ in item.messages:
                queue_keys.setdefault(queue, len(queue_keys) + 5)
        script_keys = [keys.stream, keys.log_buffer, keys.dead_letter, keys.log_shed]
        read_length = s.log_buffer_full_policy == "shed" and self.buffer_lengths.due(keys.log_buffer)
        script_keys += [keys.celery_queue(q) for q in queue_keys]
        argv: list[Any] = [
            ROUTER_GROUP,
            self.consumer,
            _DEAD_LETTER_MAXLEN,
            s.log_buffer_max_records,
            "1" if read_length else "0",
            s.events_dedup_window_s,
            len(queue_keys),
        ]
        for item in items:
            pub = 0
            if item.event_id is not None and not item.unique:
                script_keys.append(keys.published(item.event_id))
                pub = len(script_keys)
            argv += [item.eid, item.kind, item.a, item.b, pub, len(item.messages)]
            for queue, message in item.messages:
                argv += [queue_keys[queue], message]
        reply: Any = self._script(keys=script_keys, args=argv)
        done, skipped, dups, shed, sent, dead, badlist, passed, length = reply
        if read_length:
            self.buffer_lengths.read(keys.log_buffer, int(length), s.log_buffer_max_records)
        if self._confirmed:  # acknowledged (or no longer ours): forget them
            self._confirmed.difference_update(item.eid for item in items)
        if metrics.enabled() is not None:
            _count(items, int(dead), int(skipped), int(dups), {_text(p) for p in passed})
        st = self.stats
        st.entries += int(done)
        st.dispatched_tasks += int(sent)
        st.dead_lettered += int(dead)
        if skipped:
            st.skipped += int(skipped)
            log.info("router: %d entries were taken over by another router; not sent here", skipped)
        if dups:
            st.duplicates += int(dups)
            log.info("router: %d entries repeat an event already published; acknowledged, not sent", dups)
        if badlist:
            log.error(
                "router: entries dead-lettered because Celery queue keys are not lists: %s",
                ", ".join(_text(b) for b in badlist),
            )
        if shed:
            self._report_shed(int(shed))

    def _report_shed(self, count: int) -> None:
        self.stats.shed += count
        self._shed_unlogged += count
        now = time.monotonic()
        if now < self._next_shed_log_at:
            return
        log.error(
            "router: the log buffer %s is full (LOG_BUFFER_MAX_RECORDS=%d): %d event records were not "
            "buffered (%d since this router started); the events were dispatched, but are missing from "
            "PostgreSQL; counted in %s",
            self.keys.log_buffer,
            self.settings.log_buffer_max_records,
            self._shed_unlogged,
            self.stats.shed,
            self.keys.log_shed,
        )
        self._shed_unlogged = 0
        self._next_shed_log_at = now + _SHED_LOG_INTERVAL_S

    def _prepare(self, eid: str, fields: Any, first: bool = True) -> _Item:
        if not fields:  # a pending entry whose data was trimmed away
            raise MalformedEnvelope("entry was trimmed from the stream")
        marked = len(fields) == 2 and fields.get(_PUBLISHED) == b"1"
        if b"e" not in fields or len(fields) != 1 + marked:
            raise MalformedEnvelope(
                f"expected exactly one field 'e' (and {PUBLISHED_FIELD!r} from publish), "
                f"got {sorted(map(_text, fields))[:5]}"
            )
        raw = fields[b"e"]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelope("entry is not UTF-8") from None
        envelope = decode_envelope(text, self.settings.events_max_data_bytes)
        deliveries: list[tuple[str, str]] = []
        tasks: list[TaskMessage] = []
        for sub in self.registry.match(envelope.event_type):
            deliveries.append((sub.name, sub.queue))
            tasks.append(
                task_message(
                    task_name=sub.name,
                    task_id=delivery_task_id(envelope.event_id, sub.name),
                    queue=sub.queue,
                    envelope_json=text,
                    event_type=envelope.event_type,
                    event_id=envelope.event_id,
                    traceparent=envelope.traceparent,
                    tracestate=envelope.tracestate,
                    first=first,
                )
            )
        record = event_record(text, deliveries)
        unique = marked and self._unique(eid)
        if self.sender is not None:
            return _Item(eid, "d", record, "", envelope.event_id, [], fields, envelope.event_type, tasks, unique)
        messages = [(t.queue, t.redis_form()) for t in tasks]
        return _Item(eid, "d", record, "", envelope.event_id, messages, fields, envelope.event_type, unique=unique)

    def _unique(self, eid: Any) -> bool:
        """Whether a marked entry (the publish script's) can be sent without its dedup key.

        The script stores an event_id once while its dedup key lives (``EVENTS_DEDUP_WINDOW_S``
        from the entry's time): no second entry of that event can exist until then. A router
        that reads an entry older than half the window (one lagging that long, or an entry
        left pending) looks at the key as for any other entry: a publish retried after the
        key lapsed may have stored the event again, and the key then names that later
        entry, which is the one sent.
        """
        try:
            ms = int(_text(eid).split("-", 1)[0])
        except ValueError:
            return False
        return ms >= self._server_ms() - self.settings.events_dedup_window_s * 500

    def _server_ms(self) -> float:
        """Now on the Redis server's clock, which gives entry ids their times, in ms.

        This host's clock plus an offset that Redis' TIME gives once a minute: a router host
        whose clock is behind would take old entries for fresh ones. On a Redis Cluster, the
        TIME of the master that holds the stream: another node's clock may differ. Should
        TIME fail, the last offset stays (the router's own commands fail as well then).
        """
        now = time.time()
        if now >= self._clock_due:
            self._clock_due = now + 60.0
            try:
                if self.keys.cluster:  # the clock of the master that gives this stream's ids
                    node = self.client.get_node_from_key(self.keys.stream)  # type: ignore[union-attr]
                    seconds, micros = self.client.execute_command("TIME", target_nodes=node)
                else:
                    seconds, micros = self.client.time()
                after = time.time()
                self._clock_offset_ms = (seconds + micros / 1e6 - (now + after) / 2) * 1000
            except (redis.RedisError, TypeError, ValueError) as exc:  # a cluster's reply shape, say
                log.debug("router: cannot read Redis' clock (%s); keeping an offset of %.0f ms", exc,
                          self._clock_offset_ms)  # fmt: skip
        return now * 1000 + self._clock_offset_ms


def _count(items: list[_Item], dead: int, skipped: int, dups: int, passed: set[str]) -> None:
    """Count what one dispatch call did, for the metrics."""
    sent = [item for item in items if item.kind == "d" and item.eid not in passed]
    metrics.record_dispatch(
        {"dispatched": len(sent), "dead_lettered": dead, "skipped": skipped, "duplicate": dups},
        [item.event_type for item in sent],
        [queue for item in sent for queue in item.queues()],
    )


def _environmental(exc: redis.ResponseError) -> bool:
    return isinstance(exc, _ENVIRONMENTAL_ERRORS) or str(exc).startswith(_ENVIRONMENTAL_CODES)


def _nbytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _raw(fields: Any) -> str:
    if not fields:
        return ""
    return json.dumps({_text(k): _text(v)[:_RAW_KEEP_BYTES] for k, v in list(fields.items())[:10]})
