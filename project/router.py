"""The router: reads the event stream through a consumer group and dispatches Celery tasks.

For each batch it validates every entry, matches it against all subscriptions, builds one
Celery message per match and then runs one Lua script that, per entry and atomically:
checks the entry is still pending for this consumer, LPUSHes its messages onto the Celery
queues, appends its record to the log buffer (or the entry to the dead-letter stream) and
XACKs it. So an entry is dispatched once even when routers crash (its messages were either
all sent and the entry acknowledged, or neither) or when two routers race for an entry
(the one that no longer owns it sends nothing).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from project.envelope import decode_envelope
from project.errors import MalformedEnvelope
from project.keys import ROUTER_GROUP, Keys
from project.messages import build_task_message, delivery_task_id
from project.registry import Registry
from project.settings import Settings

__all__ = ["Router", "RouterStats", "ensure_group"]

log = logging.getLogger("eventbus.router")

_DEAD_LETTER_MAXLEN = 100_000
_RAW_KEEP_BYTES = 8 * 1024
_DEPARTED_IDLE_MS = 24 * 3600 * 1000

# KEYS: stream, log buffer, dead-letter, then the Celery queue lists.
# ARGV: group, consumer, dead-letter maxlen, then per entry:
#   id, kind ('d' dispatch | 'x' dead-letter), a, b, n, then n pairs (KEYS index, message)
#   for 'd': a = log record; for 'x': a = reason, b = raw entry (truncated).
_DISPATCH_LUA = """
local stream, logbuf, dlq = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, dlq_maxlen = ARGV[1], ARGV[2], ARGV[3]
local i, done, skipped = 4, 0, 0
while i <= #ARGV do
  local id, kind, a, b, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  i = i + 5
  local mine = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  if #mine == 1 then
    for j = 0, n - 1 do
      redis.call('LPUSH', KEYS[tonumber(ARGV[i + 2 * j])], ARGV[i + 2 * j + 1])
    end
    if kind == 'x' then
      redis.call('XADD', dlq, 'MAXLEN', '~', dlq_maxlen, '*', 'id', id, 'reason', a, 'raw', b)
    else
      redis.call('XADD', logbuf, '*', 'r', a)
    end
    redis.call('XACK', stream, group, id)
    done = done + 1
  else
    skipped = skipped + 1
  end
  i = i + 2 * n
end
return {done, skipped}
"""


@dataclass
class RouterStats:
    """Counters since the router started."""

    entries: int = 0
    dispatched_tasks: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    errors: int = 0


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` reading from its start (so nothing published earlier is missed)."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Router:
    """Dispatches the events of one environment to the subscriptions in ``registry``."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        consumer: str | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.keys = Keys(settings.events_prefix)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.client = client or redis.Redis.from_url(settings.redis_url)
        self.stats = RouterStats()
        self._script = self.client.register_script(_DISPATCH_LUA)
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Dispatch until ``stop`` is set. Survives Redis outages and any bad entry."""
        backoff_s = 0.1
        read_pending = True  # first our own pending entries, from a previous life
        while not stop.is_set():
            try:
                ensure_group(self.client, self.keys.stream, ROUTER_GROUP)
                while not stop.is_set():
                    if read_pending:
                        n = self._read_and_dispatch("0", block_ms=None)
                        read_pending = n > 0
                        continue
                    if time.monotonic() >= self._next_claim_at:
                        self._claim_abandoned()
                    self._read_and_dispatch(">", block_ms=self.settings.router_block_ms)
                    backoff_s = 0.1
                return
            except redis.RedisError as exc:
                log.warning("router: Redis error (%s); retrying in %.1fs", exc, backoff_s)
            except Exception:  # a bug must not end the process; the batch stays pending
                log.exception("router: unexpected error; retrying in %.1fs", backoff_s)
            self.stats.errors += 1
            read_pending = True
            stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    def _read_and_dispatch(self, start: str, block_ms: int | None) -> int:
        reply: Any = self.client.xreadgroup(
            ROUTER_GROUP,
            self.consumer,
            {self.keys.stream: start},
            count=self.settings.router_batch_size,
            block=block_ms,
        )
        if not reply:
            return 0
        entries = reply[0][1]
        self.dispatch(entries)
        return len(entries)

    def _claim_abandoned(self) -> None:
        """Take over entries pending too long for a consumer presumed dead (XAUTOCLAIM)."""
        s = self.settings
        claimed: Any = self.client.xautoclaim(
            self.keys.stream,
            ROUTER_GROUP,
            self.consumer,
            s.router_claim_idle_ms,
            start_id=self._claim_cursor,
            count=s.router_batch_size,
        )
        cursor, entries, *deleted = claimed
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if deleted and deleted[0]:
            log.error(
                "router: %d pending entries were trimmed from the stream before dispatch: %s",
                len(deleted[0]),
                deleted[0][:10],
            )
        if entries:
            log.info("router: took over %d entries abandoned by another router", len(entries))
            self.dispatch(entries)
        if self._claim_cursor == "0-0":
            self._next_claim_at = time.monotonic() + s.router_claim_idle_ms / 2000
            self._forget_departed()
        # otherwise more to claim: come back on the next turn

    def _forget_departed(self) -> None:
        # Every router start adds a consumer (host-pid) to the group; one that owns nothing
        # and has been silent for long is gone for good, and would only clutter XINFO.
        consumers: Any = self.client.xinfo_consumers(self.keys.stream, ROUTER_GROUP)
        for c in consumers:
            name = _text(c["name"])
            if name != self.consumer and not c["pending"] and c["idle"] > _DEPARTED_IDLE_MS:
                self.client.xgroup_delconsumer(self.keys.stream, ROUTER_GROUP, name)

    def dispatch(self, entries: Sequence[tuple[Any, Any]]) -> None:
        """Send the tasks of ``entries`` (read by this consumer) and acknowledge them."""
        keys = self.keys
        queue_index: dict[str, int] = {}
        script_keys: list[str] = [keys.stream, keys.log_buffer, keys.dead_letter]
        argv: list[Any] = [ROUTER_GROUP, self.consumer, _DEAD_LETTER_MAXLEN]
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            try:
                record, messages = self._prepare(eid, fields)
            except MalformedEnvelope as exc:
                argv += [eid, "x", str(exc)[:2000], _raw(fields), 0]
                self.stats.dead_lettered += 1
                log.warning("router: entry %s dead-lettered: %s", eid, exc)
                continue
            except Exception as exc:  # a bug must not stop the router: set the entry aside
                argv += [eid, "x", f"internal error: {exc!r}"[:2000], _raw(fields), 0]
                self.stats.dead_lettered += 1
                log.exception("router: entry %s dead-lettered by an internal error", eid)
                continue
            argv += [eid, "d", record, "", len(messages)]
            for queue, message in messages:
                index = queue_index.get(queue)
                if index is None:
                    script_keys.append(keys.celery_queue(queue))
                    index = queue_index[queue] = len(script_keys)
                argv += [index, message]
            self.stats.dispatched_tasks += len(messages)
        if len(argv) == 3:
            return
        done, skipped = self._script(keys=script_keys, args=argv)
        self.stats.entries += int(done)
        if skipped:
            self.stats.skipped += int(skipped)
            log.info("router: %d entries were taken over by another router; not sent here", skipped)

    def _prepare(self, eid: str, fields: Any) -> tuple[str, list[tuple[str, str]]]:
        if not fields:  # a pending entry whose data was trimmed away
            raise MalformedEnvelope("entry was trimmed from the stream")
        if set(fields) != {b"e"}:
            raise MalformedEnvelope(f"expected exactly one field 'e', got {sorted(map(_text, fields))[:5]}")
        raw = fields[b"e"]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelope("entry is not UTF-8") from None
        envelope = decode_envelope(text, self.settings.events_max_data_bytes)
        deliveries: list[list[str]] = []
        messages: list[tuple[str, str]] = []
        for sub in self.registry.match(envelope.event_type):
            task_id = delivery_task_id(envelope.event_id, sub.name)
            deliveries.append([sub.name, sub.queue, task_id])
            messages.append(
                (
                    sub.queue,
                    build_task_message(
                        task_name=sub.name,
                        task_id=task_id,
                        queue=sub.queue,
                        envelope_json=text,
                        event_type=envelope.event_type,
                        event_id=envelope.event_id,
                    ),
                )
            )
        record = (
            f'{{"k":"e","at":{time.time():.6f},"d":{json.dumps(deliveries, separators=(",", ":"))},"event":{text}}}'
        )
        return record, messages


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _raw(fields: Any) -> str:
    if not fields:
        return ""
    return json.dumps({_text(k): _text(v)[:_RAW_KEEP_BYTES] for k, v in list(fields.items())[:10]})
