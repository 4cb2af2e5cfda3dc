"""The test kit for module authors: test a module's handlers without Redis, a router or a worker.

Registered as a pytest plugin (installed with the dispatcher), it gives every test an
``events`` fixture: an in-memory bus for the test's duration. Every bus of the process
hands what it publishes to it instead of to Redis::

    def test_new_birth_data_gives_a_profile(events):
        events.publish("user.birth_data.updated", {"user_id": 42})
        events.run()  # the matching handlers, in this process, and the chain they start
        events.assert_published("module.profile.calculated", user_id=42, data={"module": "solar"})

- ``events.published("cosmic.#")`` returns the recorded envelopes (:class:`~project.event.Event`).
- ``events.assert_published(pattern, user_id=..., data={...})`` fails with a readable diff of
  what was published instead; ``data`` lists the keys to check. ``assert_not_published`` is
  the opposite.
- ``events.run()`` delivers every recorded event to its matching handlers, sync and async,
  then the events those publish, until the chain ends. It uses production's matching
  (:class:`~project.registry.Registry`), envelope validation (the router's decoder),
  contracts (``Event[Model]`` handlers get their model, upcast) and loop guard
  (``EVENTS_MAX_HOPS``): the code is the same, not a copy. A handler that raises is reported
  with its traceback (:class:`HandlerFailed`), after the others ran.
- ``events.chain(event_id)`` returns the causal tree: each event, the handlers it reached,
  and the events each of them published.

Which handlers: the modules named by ``EVENT_HANDLER_MODULES``, or by the test's
``@pytest.mark.eventbus(modules=["handlers.solar"])``. The exactly-once helpers work as in
production (their transaction, and events sent after its commit) without the delivery
record: ``event.transaction(engine)`` needs only the module's own database.

:class:`LiveEvents` offers the same methods against a real stack (publish to Redis, a router
and workers deliver), so one module test can run both ways.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from project import bus as bus_module
from project.bus import EventBus
from project.context import derived_event_id, handling
from project.envelope import decode_envelope
from project.errors import ContractViolation, EventBusError, MalformedEnvelope
from project.event import AlreadyHandled, Delivery, Event
from project.messages import delivery_task_id
from project.patterns import PatternTrie, validate_pattern
from project.registry import Subscription
from project.settings import Settings

__all__ = [
    "ChainNode",
    "DeliveryResult",
    "EventRecorder",
    "HandlerFailed",
    "InMemoryEvents",
    "LiveEvents",
    "events",
]

_UNSET: Any = object()


class HandlerFailed(AssertionError):
    """Raised by ``events.run()`` when handlers raised: each one, its event and its traceback."""

    def __init__(self, failures: Sequence[DeliveryResult]) -> None:
        self.failures = list(failures)
        lines = [f"{len(self.failures)} handler run(s) failed:"]
        for f in self.failures:
            lines.append(f"\n--- {f.handler} on {f.event_type} {f.event_id} ({f.status}) ---")
            lines.append((f.traceback or f.error or "").rstrip())
        super().__init__("\n".join(lines))


@dataclass(slots=True)
class DeliveryResult:
    """One handler run for one event: ``succeeded``, ``skipped``, ``failed`` or ``dead``."""

    event_id: str
    event_type: str
    handler: str
    queue: str
    status: str
    error: str | None = None
    traceback: str | None = None


@dataclass(slots=True)
class ChainNode:
    """An event in a causal tree, with the handlers it reached and what each one published."""

    event: Event
    deliveries: list[tuple[DeliveryResult, list[ChainNode]]] = field(default_factory=list)

    def walk(self) -> Iterator[Event]:
        """Every event of the tree, depth first, this one first."""
        yield self.event
        for _, children in self.deliveries:
            for child in children:
                yield from child.walk()

    def event_types(self) -> list[str]:
        """The event types of the tree, depth first."""
        return [e.event_type for e in self.walk()]

    def render(self, indent: str = "") -> str:
        """The tree as text, one line per event and per handler run."""
        e = self.event
        lines = [f"{indent}{e.event_type} {e.event_id} (user {e.user_id})"]
        for result, children in self.deliveries:
            mark = "" if result.status in ("succeeded", "skipped") else f"  <-- {result.status}: {result.error}"
            lines.append(f"{indent}  -> {result.handler} [{result.status}]{mark}")
            lines.extend(child.render(indent + "     ") for child in children)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _describe(expected_user: Any, expected_data: Any) -> str:
    parts = []
    if expected_user is not _UNSET:
        parts.append(f"user_id={expected_user!r}")
    if expected_data is not _UNSET:
        parts.append(f"data ⊇ {json.dumps(expected_data, sort_keys=True, default=str)}")
    return (" with " + ", ".join(parts)) if parts else ""


def _same_user(a: Any, b: Any) -> bool:
    return a == b or (a is not None and b is not None and str(a) == str(b))


def _data_mismatches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in expected.items():
        if key not in actual:
            out.append(f"data[{key!r}]: expected {value!r}, missing")
        elif actual[key] != value:
            out.append(f"data[{key!r}]: expected {value!r}, got {actual[key]!r}")
    return out


class EventRecorder:
    """What the code under test published, and the assertions on it (both kits share these)."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._events: dict[str, Event] = {}  # event_id -> envelope, in publish order
        self._lock = threading.Lock()
        self.deliveries: list[DeliveryResult] = []

    # -- publishing ---------------------------------------------------------------------

    def publish(
        self,
        event_type: str | BaseModel,
        data: Mapping[str, Any] | None = None,
        *,
        user_id: str | int | None = None,
        module: str | None = "test",
        event_id: str | None = None,
    ) -> str:
        """Publish as the code under test would (:meth:`EventBus.publish_sync`); return the id."""
        return self.bus.publish_sync(event_type, data, user_id=user_id, module=module, event_id=event_id)

    def _record(self, envelope: Mapping[str, Any]) -> None:
        with self._lock:
            self._events.setdefault(str(envelope["event_id"]), Event(dict(envelope), None))

    # -- reading ------------------------------------------------------------------------

    def published(self, pattern: str = "#", *, user_id: Any = _UNSET, data: Any = _UNSET) -> list[Event]:
        """The recorded events matching ``pattern`` (and ``user_id``, and the keys of ``data``)."""
        validate_pattern(pattern)
        trie: PatternTrie[str] = PatternTrie()
        trie.insert(pattern, pattern)
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        with self._lock:
            recorded = list(self._events.values())
        return [
            e
            for e in recorded
            if trie.match(e.event_type)
            and (user_id is _UNSET or _same_user(e.user_id, user_id))
            and (data is _UNSET or not _data_mismatches(data, e["data"]))
        ]

    def assert_published(
        self, pattern: str, *, user_id: Any = _UNSET, data: Any = _UNSET, count: int | None = None
    ) -> Event:
        """Assert an event matching ``pattern`` (``user_id``, ``data``'s keys) was published.

        ``count`` asserts exactly that many. Returns the first match. On failure the message
        lists what was published instead, with the differing fields.
        """
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        found = self.published(pattern, user_id=user_id, data=data)
        if found and (count is None or len(found) == count):
            return found[0]
        wanted = f"{pattern!r}{_describe(user_id, data)}"
        if found:
            raise AssertionError(f"expected {count} event(s) {wanted}, found {len(found)}:\n{self._listing(found)}")
        same_type = self.published(pattern)
        if same_type:
            lines = [f"no event {wanted}; published {pattern!r} events differ:"]
            for e in same_type:
                diffs = [] if user_id is _UNSET or _same_user(e.user_id, user_id) else [
                    f"user_id: expected {user_id!r}, got {e.user_id!r}"
                ]  # fmt: skip
                diffs += [] if data is _UNSET else _data_mismatches(data, e["data"])
                lines.append(f"  {e.event_type} {e.event_id} user={e.user_id!r} data={e['data']!r}")
                lines.extend(f"      {d}" for d in diffs)
            raise AssertionError("\n".join(lines))
        raise AssertionError(f"no event {wanted}; published instead:\n{self._listing(self.published())}")

    def assert_not_published(self, pattern: str, *, user_id: Any = _UNSET, data: Any = _UNSET) -> None:
        """Assert no event matching ``pattern`` (``user_id``, ``data``'s keys) was published."""
        found = self.published(pattern, user_id=user_id, data=data)
        if found:
            raise AssertionError(
                f"expected no event {pattern!r}{_describe(user_id, data)}, found {len(found)}:\n{self._listing(found)}"
            )

    @staticmethod
    def _listing(events: Sequence[Event]) -> str:
        if not events:
            return "  (nothing was published)"
        return "\n".join(f"  {e.event_type} {e.event_id} user={e.user_id!r} data={e['data']!r}" for e in events)

    def get(self, event_id: str) -> Event:
        """The recorded event ``event_id`` (KeyError if none)."""
        with self._lock:
            return self._events[event_id]

    def chain(self, event_id: str) -> ChainNode:
        """The causal tree from ``event_id``: the handlers it reached and what each published."""
        with self._lock:
            recorded = list(self._events.values())
        by_cause: dict[str, list[Event]] = {}
        for e in recorded:
            if e.causation_id:
                by_cause.setdefault(e.causation_id, []).append(e)
        runs: dict[str, list[DeliveryResult]] = {}
        for r in self.deliveries:
            runs.setdefault(r.event_id, []).append(r)
        seen: set[str] = set()

        def node(event: Event) -> ChainNode:
            seen.add(event.event_id)
            n = ChainNode(event)
            children = [c for c in by_cause.get(event.event_id, []) if c.event_id not in seen]
            for result in runs.get(event.event_id, []):
                # A handler's events have ids derived from its delivery (project.context).
                task_id = delivery_task_id(event.event_id, result.handler)
                derived = {derived_event_id(task_id, k) for k in range(1, len(children) + 1)}
                n.deliveries.append((result, [node(c) for c in children if c.event_id in derived]))
            orphans = [c for c in children if c.event_id not in seen]
            if orphans:  # published by a handler run this recorder did not see
                n.deliveries.append(
                    (DeliveryResult(event.event_id, event.event_type, "?", "?", "unknown"), [node(c) for c in orphans])
                )
            return n

        return node(self.get(event_id))

    def clear(self) -> None:
        """Forget what was published and run."""
        with self._lock:
            self._events.clear()
        self.deliveries.clear()


class InMemoryEvents(EventRecorder):
    """The ``events`` fixture: an in-memory bus, and the handlers run in this process."""

    def __init__(self, settings: Settings | None = None, *, modules: Sequence[str] | None = None) -> None:
        super().__init__(EventBus(settings))
        self._modules = modules
        self._loaded = False
        self._pending: list[tuple[str, str]] = []  # (event_id, envelope JSON) not yet delivered
        self._done: set[str] = set()  # task ids already run
        self._previous: Callable[[str, str, str], str] | None = None

    def __enter__(self) -> InMemoryEvents:
        self._previous = bus_module._capture
        bus_module._capture = self._capture
        return self

    def __exit__(self, *exc: object) -> None:
        bus_module._capture = self._previous

    def _capture(self, event_type: str, event_id: str, encoded: str) -> str:
        with self._lock:
            if event_id in self._events:  # publish is idempotent per event_id, as on Redis
                return event_id
            self._events[event_id] = Event(json.loads(encoded), None)
            self._pending.append((event_id, encoded))
        return event_id

    def load(self, *paths: str) -> None:
        """Subscribe the handler modules ``paths`` (default: the marker's, or EVENT_HANDLER_MODULES)."""
        self.bus.load_modules(list(paths) if paths else self._modules)
        self._loaded = True

    def run(self, *, only: str | Sequence[str] | None = None, raise_errors: bool = True) -> list[DeliveryResult]:
        """Deliver every recorded event to its handlers, and the events they publish, to the end.

        ``only`` (glob patterns of handler names, ``"handlers.solar.*"``) limits which handlers
        run; the others' deliveries are left out of the results. Returns this call's runs.

        Raises:
            HandlerFailed: a handler raised (or its data broke its contract); every other
                handler still ran first.
        """
        if not self._loaded:
            self.load()
        globs = [only] if isinstance(only, str) else list(only or [])
        results: list[DeliveryResult] = []
        max_bytes = self.bus.settings.events_max_data_bytes
        while True:
            with self._lock:
                if not self._pending:
                    break
                event_id, encoded = self._pending.pop(0)
            try:
                decode_envelope(encoded, max_bytes)  # what the router would set aside
            except MalformedEnvelope as exc:
                results.append(DeliveryResult(event_id, "?", "router", "-", "dead", str(exc)))
                continue
            envelope = json.loads(encoded)
            for sub in self.bus.registry.match(envelope["event_type"]):
                if globs and not any(fnmatch.fnmatchcase(sub.name, g) for g in globs):
                    continue
                results.append(self._deliver(sub, envelope))
        self.deliveries.extend(results)
        failures = [r for r in results if r.status in ("failed", "dead")]
        if failures and raise_errors:
            raise HandlerFailed(failures)
        return results

    def _deliver(self, sub: Subscription, envelope: dict[str, Any]) -> DeliveryResult:
        from project.delivery import invoke  # Celery is imported only when a test runs handlers

        task_id = delivery_task_id(envelope["event_id"], sub.name)
        result = DeliveryResult(envelope["event_id"], envelope["event_type"], sub.name, sub.queue, "succeeded")
        if task_id in self._done:
            result.status = "skipped"
            return result
        self._done.add(task_id)
        try:
            with handling(envelope, sub.module, delivery_id=task_id):
                invoke(sub, envelope, Delivery(self.bus, task_id, sub.name, recorded=False))
        except AlreadyHandled:
            result.status = "skipped"
        except Exception as exc:
            result.status = "dead" if isinstance(exc, ContractViolation) else "failed"
            result.error = repr(exc)
            result.traceback = traceback.format_exc()
        return result


class LiveEvents(EventRecorder):
    """The same methods against a real stack: Redis, a router and workers already running.

    Records every event of the bus's environment (its ``EVENTS_PREFIX``) from pub/sub while
    open; ``run()`` waits until every delivery of every recorded event is done or dead.
    """

    def __init__(self, settings: Settings | None = None, *, modules: Sequence[str] | None = None) -> None:
        super().__init__(EventBus(settings))
        self.bus.load_modules(modules)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="live-events", daemon=True)
        self._errors: dict[tuple[str, str], str] = {}

    def __enter__(self) -> LiveEvents:
        self._thread.start()
        if not self._ready.wait(10):
            raise EventBusError("could not subscribe to the bus's events")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.bus.close()

    def publish(
        self,
        event_type: str | BaseModel,
        data: Mapping[str, Any] | None = None,
        *,
        user_id: str | int | None = None,
        module: str | None = "test",
        event_id: str | None = None,
    ) -> str:
        """Publish to Redis, and return once the event is recorded here too (from pub/sub)."""
        event_id = super().publish(event_type, data, user_id=user_id, module=module, event_id=event_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if event_id in self._events:
                    return event_id
            time.sleep(0.01)
        raise EventBusError(f"event {event_id} was published but not broadcast within 10 s")

    def _listen(self) -> None:
        keys = self.bus.keys
        pubsub = self.bus.sync_client().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.psubscribe(keys.channel_pattern)
        pubsub.get_message(timeout=1)  # the subscription's confirmation
        self._ready.set()
        try:
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is None:
                    continue
                try:
                    envelope = json.loads(message["data"])
                except (ValueError, TypeError):
                    continue
                if isinstance(envelope, dict) and "event_id" in envelope and "event_type" in envelope:
                    self._record(envelope)
                    if envelope["event_type"] == "module.error" and isinstance(envelope.get("data"), dict):
                        d = envelope["data"]
                        self._errors[(str(d.get("event_id")), str(d.get("handler")))] = str(d.get("error"))
        finally:
            pubsub.close()

    def run(
        self, *, only: str | Sequence[str] | None = None, raise_errors: bool = True, timeout_s: float = 60
    ) -> list[DeliveryResult]:
        """Wait until every delivery of every recorded event is settled; return them.

        Raises:
            HandlerFailed: a delivery ended ``dead``.
            TimeoutError: deliveries were still pending after ``timeout_s``.
        """
        globs = [only] if isinstance(only, str) else list(only or [])
        client, keys = self.bus.sync_client(), self.bus.keys
        deadline = time.monotonic() + timeout_s
        quiet_since, seen = time.monotonic(), -1
        while True:
            with self._lock:
                recorded = list(self._events.values())
            results, pending = [], 0
            for e in recorded:
                for sub in self.bus.registry.match(e.event_type):
                    if globs and not any(fnmatch.fnmatchcase(sub.name, g) for g in globs):
                        continue
                    task_id, scoped = delivery_task_id(e.event_id, sub.name), keys.scoped(e.event_type)
                    # Settled: the lease key (the delivery's gate) holds 'done' or 'dead', or the
                    # delivery's hash does (project.delivery).
                    gate = client.get(scoped.lease(task_id))
                    if gate not in (b"done", b"dead"):
                        gate = client.hget(scoped.delivery(task_id), "state")
                    status = {b"done": "succeeded", b"dead": "dead"}.get(gate) if isinstance(gate, bytes) else None
                    if status is None:
                        pending += 1
                        continue
                    error = self._errors.get((e.event_id, sub.name)) if status == "dead" else None
                    results.append(DeliveryResult(e.event_id, e.event_type, sub.name, sub.queue, status, error))
            if len(recorded) != seen:
                seen, quiet_since = len(recorded), time.monotonic()
            if pending == 0 and time.monotonic() - quiet_since > 0.5:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} deliveries still pending after {timeout_s}s")
            time.sleep(0.05)
        self.deliveries = results
        failures = [r for r in results if r.status == "dead"]
        if failures and raise_errors:
            raise HandlerFailed(failures)
        return results


# -- the pytest plugin -------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``eventbus`` marker."""
    config.addinivalue_line(
        "markers", "eventbus(modules=[...]): the handler modules the events fixture runs (project.testing)"
    )


@pytest.fixture
def events(request: pytest.FixtureRequest) -> Iterator[InMemoryEvents]:
    """An in-memory bus for this test: what is published is recorded, ``run()`` delivers it."""
    marker = request.node.get_closest_marker("eventbus")
    modules = marker.kwargs.get("modules") if marker is not None else None
    with InMemoryEvents(modules=modules) as recorder:
        yield recorder
