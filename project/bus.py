"""The event bus: publish events, subscribe handlers."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, overload

import redis
import redis.asyncio
from pydantic import BaseModel

from project.coalesce import Coalescer
from project.context import current_outbox
from project.contracts import M, Upcaster, contracts, handler_model, load_contract_modules
from project.contracts import event as contract_event
from project.contracts import upcaster as contract_upcaster
from project.envelope import encode_envelope
from project.errors import InvalidContract, InvalidEventData, InvalidSubscription, PublishOutcomeUnknown, PublishRefused
from project.keys import Keys, scope_of
from project.observability import metrics, tracing
from project.observability.send_span import in_flight
from project.patterns import PatternTrie, validate_pattern
from project.redis_conn import async_redis_client, cluster_known, is_cluster, keys_for, redis_client, send_one
from project.registry import Declaration, Registry, Subscription, declarations, declare
from project.settings import Settings, get_settings

if TYPE_CHECKING:
    from project.modules import BaseModule

__all__ = ["EventBus"]

F = TypeVar("F", bound=Callable[..., Any])
_QUEUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
# kombu's Redis transport keeps its own bookkeeping under the same key prefix as the queues:
# a queue named like one of these would be a hash or a sorted set, not a list.
_RESERVED_QUEUES = frozenset({"unacked", "unacked_index", "unacked_mutex"})

# XADD and PUBLISH of a batch of events (one for publish_sync, all those that arrived
# together for publish: project.coalesce) in one round trip, atomically: an event is either
# in the stream (and so will be dispatched) and broadcast, or its call failed and nothing of
# it happened. Each event_id is remembered for the dedup window, so the same publish sent
# again (by redis-py's retry after a dropped connection, or by a caller retrying with the
# event_id) stores nothing. Each event is stored on its own (redis.pcall): one that Redis
# refuses is that event's reply, an error, and the others are stored. No MAXLEN: an entry
# is trimmed only once the routers acknowledged it (project.router).
# Per event: XADD, then SET NX EX of the dedup key to the new entry's id, then PUBLISH: three
# commands, one less than a GET of the key first (then XADD, SET, PUBLISH) took. A duplicate,
# which is rare, pays for it (XADD, SET, then undo's XINFO, XDEL, XSETID, and GET, where one
# GET did): its SET finds the key taken, so the script takes the XADD back and replies the
# key's value, the earlier id, or WRONGTYPE for a key of another type (SET NX does not look
# at the type): refused, nothing stored, as before. A SET that fails takes the XADD back too
# and replies its error. The key holds the id of the entry it was published as. The entry
# carries field 'p' = '1' (project.keys.PUBLISHED_FIELD): one event_id, one entry, so the
# router skips the key for it; an entry added by anything else is compared with the key.
# Taking an XADD back: XDEL, then XSETID puts back the stream's entries-added and
# max-deleted-entry-id. Without it Redis 7.0 reports a wrong lag in XINFO GROUPS (one too
# many per duplicate, for good, once the group has read past it; redis/redis#13337), which
# the router lag gauge and the tests' idle checks read. XSETID ignores a max-deleted id of
# 0-0 (nothing ever deleted); 0-1, before any entry, means the same to Redis. The XDEL'd
# entry's id is not given out again (the stream's last id stays), no reader sees the entry
# (the script is atomic; a router blocked in XREADGROUP is served after it, from past its
# group's last-delivered id: Redis 7.0 wakes it with an empty reply, and it reads again),
# and trimming (XTRIM MINID, from the groups' positions) does not depend on it.
# KEYS: stream, then each event's dedup key. ARGV: dedup window (s), then the events'
# envelopes and channels, each followed by a newline but the last (one argument for the
# whole batch: redis-py packs each argument in Python, three per event would cost more than
# the rest of the batch; no envelope or channel holds a newline, JSON escapes it).
# Returns each event's stream id (or error), in order.
PUBLISH_LUA = """
local function undo(stream, id, set)
  local info, added, deleted = redis.pcall('XINFO', 'STREAM', stream), nil, nil
  if not info['err'] then
    for k = 1, #info - 1, 2 do
      if info[k] == 'entries-added' then added = info[k + 1] end
      if info[k] == 'max-deleted-entry-id' then deleted = info[k + 1] end
    end
  end
  local gone = redis.pcall('XDEL', stream, id)
  if gone ~= 1 then  -- refused (an ACL without XDEL): the entry stays; say so, and why it was undone
    local why = (type(gone) == 'table' and gone['err']) or 'XDEL removed nothing'
    local cause = 'was published already'
    if set and set['err'] then cause = 'could not get its dedup key (' .. set['err'] .. ')' end
    return redis.error_reply('EVENTBUS-UNDO ' .. cause .. ', and its new entry ' .. id ..
      ' could not be taken back (' .. why .. '): it stays in the stream')
  end
  if added and deleted then
    if deleted == '0-0' then deleted = '0-1' end
    redis.pcall('XSETID', stream, id, 'ENTRIESADDED', added - 1, 'MAXDELETEDID', deleted)
  end
end
local batch, out, at = ARGV[2], {}, 1
for i = 2, #KEYS do
  local cut = string.find(batch, '\\n', at, true)
  local envelope = string.sub(batch, at, cut - 1)
  at = string.find(batch, '\\n', cut + 1, true) or #batch + 1
  local channel = string.sub(batch, cut + 1, at - 1)
  at = at + 1
  local id = redis.pcall('XADD', KEYS[1], '*', 'e', envelope, 'p', '1')
  if type(id) == 'string' then
    local set = redis.pcall('SET', KEYS[i], id, 'NX', 'EX', ARGV[1])
    if set and set['ok'] then
      redis.pcall('PUBLISH', channel, envelope)
    else
      id = undo(KEYS[1], id, set) or set or redis.pcall('GET', KEYS[i])
    end
  end
  out[i - 1] = id
end
return out
"""
_PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()

# Set by the test kit (project.testing) for a test's duration: every bus of the process hands
# its encoded events here instead of to Redis. Called (event_type, event_id, envelope JSON).
_capture: Callable[[str, str, str], str] | None = None


_UNDO_ERROR = "EVENTBUS-UNDO "  # PUBLISH_LUA's error for an XADD it had to, and could not, take back


def _publish_error(exc: redis.RedisError, event_type: str, event_id: str) -> Exception:
    """The error a failed publish raises: refused (nothing stored) or of unknown outcome.

    Unknown: the connection broke, or Redis's reply could not be read (the script may have
    run). Refused: Redis said no (its own error reply), or the client refused to send.
    """
    broken = isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.exceptions.InvalidResponse)
    if broken and not isinstance(exc, redis.exceptions.AuthenticationError):
        return PublishOutcomeUnknown(
            f"the connection to Redis failed while publishing {event_type!r} ({exc}); the event may "
            f"or may not be stored: publish it again with event_id={event_id!r}, which never stores it twice",
            event_id,
        )
    if str(exc).startswith(_UNDO_ERROR):
        return PublishRefused(
            f"event {event_type!r} {event_id} {str(exc)[len(_UNDO_ERROR) :]}; "
            "a Redis user that publishes needs XINFO, XDEL and XSETID"
        )
    return PublishRefused(f"Redis refused event {event_type!r} ({exc}); nothing was stored")


_NO_COALESCER: tuple[Callable[[], object], None] = (lambda: None, None)


class _Validated:
    """The contract check of a model instance's data, validated already against ``version``."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        self.version = version

    def __call__(self, event_type: str, data: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
        return dict(data), self.version


class EventBus:
    """Publishes events to Redis and holds this process's subscriptions.

    Creating one opens no connection; clients are made on first publish, one per process
    (and one per event loop for :meth:`publish`).
    """

    def __init__(self, settings: Settings | None = None, *, shared: bool = False) -> None:
        """Make a bus (``settings`` default to the process-wide ones).

        ``shared`` marks the process-wide bus (``project.events.event_bus``): subscriptions
        made with its decorator also reach every other bus that loads their modules.
        """
        self._settings = settings
        self._shared = shared
        self.registry = Registry()
        self.modules: dict[type[BaseModule], BaseModule] = {}
        self._sync_client: redis.Redis | None = None
        self._target: tuple[str, int] | None = None
        self._keys: Keys | None = None
        # On a Redis Cluster: each scope's (stream, dedup key prefix), and coalescers per loop.
        self._scoped = False
        self._scope_targets: dict[str, tuple[str, str]] = {}
        self._scope_coalescers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Coalescer]] = (
            weakref.WeakKeyDictionary()
        )
        self._channel_prefix = ""
        self._dedup_prefix = ""
        self._contracts_loaded = False
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Coalescer] = (
            weakref.WeakKeyDictionary()
        )
        self._last_coalescer: tuple[Callable[[], object], Coalescer | None] = _NO_COALESCER

    @property
    def settings(self) -> Settings:
        """The settings this bus uses (the process-wide ones unless given)."""
        return self._settings or get_settings()

    @property
    def keys(self) -> Keys:
        """Names of this environment's keys and channels (a stream per scope on a Redis Cluster).

        Raises:
            redis.RedisError: asking Redis whether it is a cluster failed (``REDIS_CLUSTER`` unset).
        """
        if self._keys is None or self._keys.prefix != self.settings.events_prefix:
            self._keys = keys_for(self.settings)
        return self._keys

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        event_type: str | BaseModel,
        data: Mapping[str, Any] | None = None,
        *,
        user_id: str | int | uuid.UUID | None = None,
        module: str | None = None,
        event_id: str | uuid.UUID | None = None,
    ) -> str:
        """Publish an event and return its event_id once Redis holds it.

        ``publish("cosmic.solar_storm.detected", {...})`` or ``publish(SolarStormDetected(...))``:
        data of an event type with a contract (:mod:`project.contracts`) is validated against
        its model, the latest version for a dict, the instance's own for a model. Never waits
        for a handler. ``user_id`` may also arrive inside ``data``. Called from
        inside a handler, the new event carries causation_id, correlation_id and hops + 1.
        Publishing is idempotent per ``event_id`` within ``EVENTS_DEDUP_WINDOW_S``: give the
        id of an earlier call (``PublishOutcomeUnknown.event_id``) to retry it safely.

        Raises:
            InvalidEventName: the name is not 2 to 4 lower-case snake_case segments.
            InvalidEventData: data is not a dict, does not satisfy the event type's contract
                (the message and ``errors`` name the fields), names a different user_id,
                holds a NUL character, or another envelope field is invalid (an event_id
                that is no UUID).
            PayloadNotSerializable: data cannot be encoded as JSON.
            PayloadTooLarge: the event is over ``EVENTS_MAX_DATA_BYTES``.
            HopLimitExceeded: the chain is longer than ``EVENTS_MAX_HOPS``.
            PublishRefused: Redis refused the write (out of memory, read-only); nothing stored.
            PublishOutcomeUnknown: the connection broke; the event may be stored. Retry with
                its ``event_id``.
        """
        event_type, data, version = self._typed(event_type, data)
        if not tracing.active():
            event_id, encoded = self._encode(event_type, data, user_id, module, event_id, version)
            return await self._store(event_type, event_id, encoded)
        span, trace = tracing.start_send(event_type)
        if span is None:  # it records nothing: its context in the envelope is all there is
            event_id, encoded = self._encode(event_type, data, user_id, module, event_id, version, trace)
            return await self._store(event_type, event_id, encoded)
        try:
            event_id, encoded = self._encode(event_type, data, user_id, module, event_id, version, trace)
            span.set_attribute("messaging.message.id", event_id)
            return await self._store(event_type, event_id, encoded)
        except BaseException as exc:
            tracing.fail_send(span, exc)
            raise
        finally:
            span.end()

    def publish_sync(
        self,
        event_type: str | BaseModel,
        data: Mapping[str, Any] | None = None,
        *,
        user_id: str | int | uuid.UUID | None = None,
        module: str | None = None,
        event_id: str | uuid.UUID | None = None,
    ) -> str:
        """The same as :meth:`publish`, for synchronous code (Celery tasks, scripts)."""
        event_type, data, version = self._typed(event_type, data)
        if not tracing.active():
            return self._deliver(event_type, *self._encode(event_type, data, user_id, module, event_id, version))
        # The span is handled in place, not by a `with` block: a publish pays for the block's
        # objects and calls in full (see "Performance" in the README).
        span, trace = tracing.start_send(event_type)
        if span is None:  # it records nothing: its context in the envelope is all there is
            return self._deliver(event_type, *self._encode(event_type, data, user_id, module, event_id, version, trace))
        try:
            event_id, encoded = self._encode(event_type, data, user_id, module, event_id, version, trace)
            span.set_attribute("messaging.message.id", event_id)
            # the span gets ready to end while Redis answers (project.observability.send_span)
            return self._deliver(event_type, event_id, encoded, in_flight(span))
        except BaseException as exc:
            tracing.fail_send(span, exc)
            raise
        finally:
            span.end()

    def _deliver(
        self, event_type: str, event_id: str, encoded: str, meanwhile: Callable[[], None] | None = None
    ) -> str:
        """Send a built event, or keep it for the open exactly-once block to send after its commit."""
        if current_outbox() is not None:
            return self._keep(event_type, event_id, encoded)
        return self._send(event_type, event_id, encoded, meanwhile)

    async def _store(self, event_type: str, event_id: str, encoded: str) -> str:
        """Send one event built by :meth:`publish`, coalesced with the loop's other publishes."""
        if current_outbox() is not None:
            return self._keep(event_type, event_id, encoded)
        if _capture is not None:  # the test kit's in-memory bus (project.testing)
            return _capture(event_type, event_id, encoded)
        try:
            if self._target is None and not cluster_known(self.settings):
                # Asked of Redis once, on a thread: a Redis that does not answer (a host gone,
                # packets dropped) holds that thread up to its timeout, never this event loop.
                await asyncio.to_thread(is_cluster, self.settings)
            if self._scoped or self._target is None:
                coalescer, dedup_prefix = self._scope_coalescer(event_type)
                if self._scoped:
                    # A new asyncio RedisCluster learns the topology here, once, under its lock.
                    # Left to a burst of first commands, it was learnt twice now and then, and
                    # the second time closed connections the others were still opening: a
                    # publish then raised redis-py's AttributeError (on None's writelines).
                    await coalescer.client.initialize()
            else:
                coalescer, dedup_prefix = self._coalescer(), self._dedup_prefix
            # concurrent calls on this loop share a round trip (project.coalesce)
            await coalescer.publish((dedup_prefix + event_id, encoded, self._channel_prefix + event_type))
        except redis.RedisError as exc:
            raise _publish_error(exc, event_type, event_id) from exc
        metrics.record_published(event_type)
        return event_id

    @staticmethod
    def _keep(event_type: str, event_id: str, encoded: str) -> str:
        """Hand the event to the open exactly-once block, which sends it after its commit."""
        outbox = current_outbox()
        assert outbox is not None
        outbox.append((event_type, event_id, encoded))
        return event_id

    def send_encoded(self, event_type: str, event_id: str, encoded: str) -> str:
        """Store an event already built by :meth:`publish` (idempotent per event_id).

        Raises:
            PublishRefused, PublishOutcomeUnknown: as :meth:`publish`.
        """
        return self._send(event_type, event_id, encoded)

    def _send(self, event_type: str, event_id: str, encoded: str, meanwhile: Callable[[], None] | None = None) -> str:
        """:meth:`send_encoded`, doing ``meanwhile`` while Redis answers (see ``send_one``)."""
        if _capture is not None:  # the test kit's in-memory bus (project.testing)
            return _capture(event_type, event_id, encoded)
        if "\n" in encoded:  # the script splits its batch at newlines; JSON as publish writes it has none
            raise ValueError(f"event {event_id}: not an envelope built by publish (it holds a newline)")
        try:
            client = self._sync_client or self.sync_client()
            stream, window = self._target or self._publish_target()
            dedup_prefix = self._dedup_prefix
            if self._scoped:  # a Redis Cluster: the event's scope has its own stream
                stream, dedup_prefix = self._scope_target(event_type)
            # EVALSHA straight away: redis-py's Script wrapper (and its evalsha's) cost more than the encoding.
            dedup, batch = dedup_prefix + event_id, f"{encoded}\n{self._channel_prefix}{event_type}"
            args = ("EVALSHA", _PUBLISH_SHA, 2, stream, dedup, window, batch)
            try:
                (reply,) = send_one(client, *args, meanwhile=meanwhile)
            except redis.exceptions.NoScriptError:  # a new or flushed Redis: load it once
                client.script_load(PUBLISH_LUA)
                (reply,) = send_one(client, *args, meanwhile=meanwhile)
            if isinstance(reply, redis.RedisError):  # Redis refused this event (the script's pcall)
                raise reply
        except redis.RedisError as exc:
            raise _publish_error(exc, event_type, event_id) from exc
        metrics.record_published(event_type)
        return event_id

    def _publish_target(self) -> tuple[str, int]:
        """``(stream, dedup window)``; also fixes the dedup key and channel prefixes.

        On a Redis Cluster the stream and dedup prefix are each scope's (:meth:`_scope_target`).
        """
        if self._target is None:
            keys = self.keys
            self._scoped = keys.cluster
            self._channel_prefix = keys.channel("")
            self._dedup_prefix = keys.published("")
            self._target = (keys.stream, self.settings.events_dedup_window_s)
        return self._target

    def _scope_target(self, event_type: str) -> tuple[str, str]:
        """``(stream, dedup key prefix)`` of ``event_type``'s scope on a Redis Cluster."""
        scope = scope_of(event_type)
        target = self._scope_targets.get(scope)
        if target is None:
            keys = self.keys.of_scope(scope)
            target = self._scope_targets[scope] = (keys.stream, keys.published(""))
        return target

    def _typed(
        self, event: str | BaseModel, data: Mapping[str, Any] | None
    ) -> tuple[str, Mapping[str, Any] | None, int | None]:
        """``(event_type, data, version)``: a model instance becomes its contract's type and data."""
        if not self._contracts_loaded:
            load_contract_modules(self.settings.event_contract_modules, required=False)
            self._contracts_loaded = True
        if type(event) is not str and isinstance(event, BaseModel):
            if data is not None:
                raise InvalidEventData(
                    f"publish({type(event).__qualname__}(...)) carries its data in the model: do not pass data too"
                )
            return contracts.of_instance(event)
        return event, data, None

    def _encode(
        self,
        event_type: str,
        data: Mapping[str, Any] | None,
        user_id: Any,
        module: str | None,
        event_id: str | uuid.UUID | None = None,
        version: int | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """``(event_id, envelope JSON)``; ``trace``: the publish span's context as envelope
        fields (:func:`tracing.start_send`), when tracing is on."""
        s = self.settings
        return encode_envelope(
            event_type,
            data,
            user_id=user_id,
            module=module,
            max_bytes=s.events_max_data_bytes,
            max_hops=s.events_max_hops,
            event_id=event_id,
            # A model instance was validated by _typed against its own version.
            contract=partial(contracts.outgoing, within=s.event_contract_modules)
            if version is None
            else _Validated(version),
            trace=trace,
        )

    def sync_client(self) -> redis.Redis:
        """This process's Redis client (created on first use; redis-py resets it after fork).

        A ``RedisCluster`` when ``REDIS_URL`` names a Redis Cluster (:mod:`project.redis_conn`).
        """
        if self._sync_client is None:
            self._sync_client = redis_client(self.settings)
        return self._sync_client  # type: ignore[return-value]

    def _coalescer(self) -> Coalescer:
        # An asyncio client belongs to the loop it was made on: keep one per loop. The last
        # one used is at hand (a WeakKeyDictionary look-up makes a weak reference each time).
        loop = asyncio.get_running_loop()
        last_loop, coalescer = self._last_coalescer
        if last_loop() is loop and coalescer is not None:
            return coalescer
        coalescer = self._async_clients.get(loop)
        if coalescer is None:
            client = async_redis_client(self.settings)
            stream, window = self._publish_target()
            coalescer = self._async_clients[loop] = Coalescer(client, PUBLISH_LUA, stream, window)
        self._last_coalescer = (weakref.ref(loop), coalescer)
        return coalescer

    def _scope_coalescer(self, event_type: str) -> tuple[Coalescer, str]:
        """``(coalescer, dedup key prefix)`` for ``event_type`` on this loop.

        In one Redis, the loop's one coalescer. On a Redis Cluster, one per scope (a script
        run touches one slot), sharing the loop's client.
        """
        _, window = self._target or self._publish_target()
        if not self._scoped:
            return self._coalescer(), self._dedup_prefix
        loop = asyncio.get_running_loop()
        per_scope = self._scope_coalescers.get(loop)
        if per_scope is None:
            per_scope = self._scope_coalescers[loop] = {}
        stream, dedup_prefix = self._scope_target(event_type)
        coalescer = per_scope.get(stream)
        if coalescer is None:
            client = next(iter(per_scope.values())).client if per_scope else async_redis_client(self.settings)
            coalescer = per_scope[stream] = Coalescer(client, PUBLISH_LUA, stream, window)
        return coalescer, dedup_prefix

    async def aclose(self) -> None:
        """Close the Redis client :meth:`publish` made for the running event loop, once the
        publishes under way have their outcome.

        Call it before the loop ends (``asyncio.run`` closes it), as with any asyncio client.
        """
        loop = asyncio.get_running_loop()
        coalescer = self._async_clients.get(loop)
        per_scope = self._scope_coalescers.get(loop) or {}
        for under_way in (coalescer, *per_scope.values()):
            if under_way is not None:
                await under_way.wait()  # cancelled here, nothing is closed: a later aclose still can
        self._async_clients.pop(loop, None)
        self._scope_coalescers.pop(loop, None)
        self._last_coalescer = _NO_COALESCER
        if coalescer is not None:
            await coalescer.client.aclose()
        if per_scope:
            await next(iter(per_scope.values())).client.aclose()

    def close(self) -> None:
        """Close the synchronous Redis client (a later publish makes a new one)."""
        if self._sync_client is not None:
            self._sync_client.close()
        self._sync_client = None

    # -- subscribing ------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        pattern: str | Sequence[str],
        handler: None = None,
        *,
        queue: str | None = None,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        time_limit_s: float | None = None,
        soft_time_limit_s: float | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]: ...

    @overload
    def subscribe(
        self,
        pattern: str | Sequence[str],
        handler: Callable[..., Any],
        *,
        queue: str | None = None,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        time_limit_s: float | None = None,
        soft_time_limit_s: float | None = None,
        name: str | None = None,
    ) -> Subscription: ...

    def subscribe(
        self,
        pattern: str | Sequence[str],
        handler: Callable[..., Any] | None = None,
        *,
        queue: str | None = None,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        time_limit_s: float | None = None,
        soft_time_limit_s: float | None = None,
        name: str | None = None,
    ) -> Any:
        """Subscribe ``handler`` to the events matching ``pattern`` (or a list of patterns).

        Use it as a call, ``event_bus.subscribe("user.birth_data.updated", self.recalculate)``,
        or as a decorator, ``@event_bus.subscribe("cosmic.#", queue="synthesis")``. ``*``
        matches one segment, ``#`` zero or more. The handler gets the envelope dict; it may
        be ``async def``. Each subscription becomes its own Celery task, named after the
        handler (or ``name``), on ``queue`` (default: the module's name).

        Raises:
            InvalidPattern: a pattern is malformed or can never match.
            InvalidSubscription: a bad queue name, retry count or handler.
            DuplicateHandler: the handler is already subscribed.
        """
        patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
        if not patterns:
            raise InvalidSubscription("subscribe needs at least one pattern")
        for p in patterns:
            validate_pattern(p)

        def add(func: Callable[..., Any]) -> Subscription:
            return self._add(
                patterns,
                func,
                queue=queue,
                max_retries=max_retries,
                backoff_s=backoff_s,
                backoff_max_s=backoff_max_s,
                time_limit_s=time_limit_s,
                soft_time_limit_s=soft_time_limit_s,
                name=name,
            )

        if handler is None:

            def decorator(func: F) -> F:
                add(func)
                if not self._shared:
                    return func
                options = (
                    ("queue", queue), ("max_retries", max_retries), ("backoff_s", backoff_s),
                    ("backoff_max_s", backoff_max_s), ("time_limit_s", time_limit_s),
                    ("soft_time_limit_s", soft_time_limit_s), ("name", name),
                )  # fmt: skip
                declare(Declaration(patterns, func, options))
                return func

            return decorator
        return add(handler)

    def apply_declarations(self, paths: Sequence[str]) -> None:
        """Add the decorator subscriptions made under ``paths`` that this bus does not have yet."""
        present = {id(sub.handler) for sub in self.registry}
        for d in declarations(list(paths)):
            if id(d.handler) not in present:
                self._add(d.patterns, d.handler, **dict(d.options))

    def _add(
        self,
        patterns: tuple[str, ...],
        handler: Callable[..., Any],
        *,
        queue: str | None,
        max_retries: int | None,
        backoff_s: float | None,
        backoff_max_s: float | None,
        time_limit_s: float | None,
        soft_time_limit_s: float | None,
        name: str | None,
    ) -> Subscription:
        if not callable(handler):
            raise InvalidSubscription(f"handler must be callable, got {type(handler).__name__}")
        from project.modules import BaseModule

        owner = getattr(handler, "__self__", None)
        func = getattr(handler, "__func__", handler)
        if name is None:
            qualname = getattr(func, "__qualname__", "")
            if not qualname or "<" in qualname:
                raise InvalidSubscription(
                    f"cannot name the task of handler {handler!r} (a lambda or partial?): "
                    "pass name='module.handler_name'"
                )
            name = f"{func.__module__}.{qualname}"
        if isinstance(owner, BaseModule):
            module: str | None = owner.name
            queue = queue or owner.queue
        else:
            module = (getattr(func, "__module__", None) or "").rsplit(".", 1)[-1] or None
            queue = queue or module
        if not queue or not _QUEUE_RE.match(queue):
            raise InvalidSubscription(f"invalid queue name {queue!r}: use letters, digits, '_', '.', '-'")
        if queue in _RESERVED_QUEUES:
            raise InvalidSubscription(
                f"queue name {queue!r} is reserved by Celery's Redis transport "
                f"({sorted(_RESERVED_QUEUES)}); choose another"
            )
        s = self.settings
        max_retries = s.delivery_max_retries if max_retries is None else max_retries
        if not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidSubscription(f"max_retries must be an int >= 0, got {max_retries!r}")
        for option, value in (("time_limit_s", time_limit_s), ("soft_time_limit_s", soft_time_limit_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise InvalidSubscription(f"{option} must be a number of seconds > 0, got {value!r}")
        if time_limit_s and soft_time_limit_s and soft_time_limit_s >= time_limit_s:
            raise InvalidSubscription(
                f"soft_time_limit_s ({soft_time_limit_s}) must be below time_limit_s ({time_limit_s}): "
                "the soft limit warns the handler, the hard one kills it"
            )
        model = self._handler_model(handler, name, patterns)
        sub = Subscription(
            name=name,
            patterns=patterns,
            handler=handler,
            queue=queue,
            module=module,
            max_retries=max_retries,
            backoff_s=s.delivery_backoff_s if backoff_s is None else float(backoff_s),
            backoff_max_s=s.delivery_backoff_max_s if backoff_max_s is None else float(backoff_max_s),
            time_limit_s=time_limit_s,
            soft_time_limit_s=soft_time_limit_s,
            model=model,
        )
        self.registry.add(sub)
        return sub

    @staticmethod
    def _handler_model(handler: Callable[..., Any], name: str, patterns: tuple[str, ...]) -> type[BaseModel] | None:
        try:
            model = handler_model(handler)
        except InvalidContract as exc:
            raise InvalidSubscription(str(exc)) from None
        contract = None if model is None else contracts.for_model(model)
        if contract is not None:
            trie: PatternTrie[str] = PatternTrie()
            for p in patterns:
                trie.insert(p, p)
            if not trie.match(contract.event_type):
                raise InvalidSubscription(
                    f"handler {name} takes Event[{contract.model.__qualname__}], the contract of "
                    f"{contract.event_type!r}, but none of its patterns {list(patterns)} matches that event type"
                )
        return model

    # -- contracts --------------------------------------------------------------------

    @staticmethod
    def event(event_type: str, *, version: int = 1) -> Callable[[M], M]:
        """Class decorator: declare a pydantic model as the data of ``event_type`` at ``version``.

        See :mod:`project.contracts`. Contracts are process-wide: every bus sees them.

        Raises:
            InvalidContract: a bad name or version, or another model holds that version.
        """
        return contract_event(event_type, version=version)

    @staticmethod
    def upcaster(event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Function decorator: turn data of ``event_type`` at ``from_version`` into the next version's."""
        return contract_upcaster(event_type, from_version=from_version)

    # -- modules ----------------------------------------------------------------------

    def load_modules(self, paths: Sequence[str] | None = None) -> list[BaseModule]:
        """Import the handler modules (``EVENT_HANDLER_MODULES``) and initialize each module once.

        Idempotent: a second call in the same process returns the modules already made.
        """
        from project.modules import load_modules

        return load_modules(self, self.settings.event_handler_modules if paths is None else paths)
