"""The event bus: publish events, subscribe handlers."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
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
from project.keys import Keys
from project.observability import metrics
from project.observability.tracing import publish_span
from project.patterns import PatternTrie, validate_pattern
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

# XADD and PUBLISH in one round trip, atomically: an event is either in the stream (and so
# will be dispatched) and broadcast, or the call failed and nothing happened. The event_id
# is remembered for the dedup window, so the same publish sent again (by redis-py's retry
# after a dropped connection, or by a caller retrying with the event_id) stores nothing.
# No MAXLEN: an entry is trimmed only once the routers acknowledged it (project.router).
# KEYS: stream, dedup key. ARGV: envelope, channel, dedup window (s).
_PUBLISH_LUA = """
local prev = redis.call('GET', KEYS[2])
if prev then return prev end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return id
"""
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()

# Set by the test kit (project.testing) for a test's duration: every bus of the process hands
# its encoded events here instead of to Redis. Called (event_type, event_id, envelope JSON).
_capture: Callable[[str, str, str], str] | None = None


def _publish_error(exc: redis.RedisError, event_type: str, event_id: str) -> Exception:
    """The error a failed publish raises: refused (nothing stored) or of unknown outcome."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError) and not isinstance(
        exc, redis.exceptions.AuthenticationError
    ):
        return PublishOutcomeUnknown(
            f"the connection to Redis failed while publishing {event_type!r} ({exc}); the event may "
            f"or may not be stored: publish it again with event_id={event_id!r}, which never stores it twice",
            event_id,
        )
    return PublishRefused(f"Redis refused event {event_type!r} ({exc}); nothing was stored")


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
        self._channel_prefix = ""
        self._dedup_prefix = ""
        self._contracts_loaded = False
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Coalescer] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def settings(self) -> Settings:
        """The settings this bus uses (the process-wide ones unless given)."""
        return self._settings or get_settings()

    @property
    def keys(self) -> Keys:
        """Names of this environment's keys and channels."""
        return Keys(self.settings.events_prefix)

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
        with publish_span(event_type) as span:
            event_id, encoded, kept = self._prepare(span, event_type, data, user_id, module, event_id, version)
            if kept:
                return event_id
            if _capture is not None:  # the test kit's in-memory bus (project.testing)
                return _capture(event_type, event_id, encoded)
            args = self._script_args(event_type, event_id, encoded)
            try:  # concurrent calls on this loop share a round trip (project.coalesce)
                await self._coalescer().evalsha(args)
            except redis.RedisError as exc:
                raise _publish_error(exc, event_type, event_id) from exc
        metrics.record_published(event_type)
        return event_id

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
        with publish_span(event_type) as span:
            event_id, encoded, kept = self._prepare(span, event_type, data, user_id, module, event_id, version)
            if kept:
                return event_id
            return self.send_encoded(event_type, event_id, encoded)

    def _prepare(
        self,
        span: Any,
        event_type: str,
        data: Mapping[str, Any] | None,
        user_id: Any,
        module: str | None,
        event_id: str | uuid.UUID | None,
        version: int | None,
    ) -> tuple[str, str, bool]:
        """Build the event: ``(event_id, envelope JSON, kept)``; ``kept`` if an exactly-once
        block took it, to be sent after its commit."""
        event_id, encoded = self._encode(event_type, data, user_id, module, event_id, version)
        if span is not None:
            span.set_attribute("messaging.message.id", event_id)
        outbox = current_outbox()
        if outbox is not None:
            outbox.append((event_type, event_id, encoded))
            return event_id, encoded, True
        return event_id, encoded, False

    def send_encoded(self, event_type: str, event_id: str, encoded: str) -> str:
        """Store an event already built by :meth:`publish` (idempotent per event_id).

        Raises:
            PublishRefused, PublishOutcomeUnknown: as :meth:`publish`.
        """
        if _capture is not None:  # the test kit's in-memory bus (project.testing)
            return _capture(event_type, event_id, encoded)
        client, args = self.sync_client(), self._script_args(event_type, event_id, encoded)
        try:
            try:
                # EVALSHA straight away: redis-py's Script wrapper costs more than the encoding.
                client.evalsha(*args)
            except redis.exceptions.NoScriptError:  # a new or flushed Redis: load it once
                client.script_load(_PUBLISH_LUA)
                client.evalsha(*args)
        except redis.RedisError as exc:
            raise _publish_error(exc, event_type, event_id) from exc
        metrics.record_published(event_type)
        return event_id

    def _script_args(self, event_type: str, event_id: str, encoded: str) -> tuple[Any, ...]:
        stream, window = self._publish_target()
        dedup, channel = self._dedup_prefix + event_id, self._channel_prefix + event_type
        return (_PUBLISH_SHA, 2, stream, dedup, encoded, channel, window)

    def _publish_target(self) -> tuple[str, int]:
        if self._target is None:
            keys = self.keys
            self._channel_prefix = keys.channel("")
            self._dedup_prefix = keys.published("")
            self._target = (keys.stream, self.settings.events_dedup_window_s)
        return self._target

    def _typed(
        self, event: str | BaseModel, data: Mapping[str, Any] | None
    ) -> tuple[str, Mapping[str, Any] | None, int | None]:
        """``(event_type, data, version)``: a model instance becomes its contract's type and data."""
        if not self._contracts_loaded:
            load_contract_modules(self.settings.event_contract_modules, required=False)
            self._contracts_loaded = True
        if isinstance(event, BaseModel):
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
    ) -> tuple[str, str]:
        s = self.settings
        if version is None:
            paths = s.event_contract_modules

            def check(event_type: str, data: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
                return contracts.outgoing(event_type, data, within=paths)
        else:  # a model instance, validated by _typed against its own version

            def check(event_type: str, data: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
                return dict(data), version

        return encode_envelope(
            event_type,
            data,
            user_id=user_id,
            module=module,
            max_bytes=s.events_max_data_bytes,
            max_hops=s.events_max_hops,
            event_id=event_id,
            contract=check,
        )

    def sync_client(self) -> redis.Redis:
        """This process's Redis client (created on first use; redis-py resets it after fork)."""
        if self._sync_client is None:
            self._sync_client = redis.Redis.from_url(self.settings.redis_url)
        return self._sync_client

    def _coalescer(self) -> Coalescer:
        # An asyncio client belongs to the loop it was made on: keep one per loop.
        loop = asyncio.get_running_loop()
        coalescer = self._async_clients.get(loop)
        if coalescer is None:
            client = redis.asyncio.Redis.from_url(self.settings.redis_url)
            coalescer = self._async_clients[loop] = Coalescer(client, _PUBLISH_LUA)
        return coalescer

    async def aclose(self) -> None:
        """Close the Redis client :meth:`publish` made for the running event loop.

        Call it before the loop ends (``asyncio.run`` closes it), as with any asyncio client.
        """
        coalescer = self._async_clients.pop(asyncio.get_running_loop(), None)
        if coalescer is not None:
            await coalescer.client.aclose()

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
