"""Hostile input, fuzzed with hypothesis: raw stream entries and the arguments of publish.

Every fuzzed stream entry is either dead-lettered with its reason or, if it happens to be a
valid event, delivered and logged; every publish call either raises an EventBusError or is
delivered and logged. No router, worker or log writer dies of any of it.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st

from project.errors import EventBusError
from project.keys import PUBLISHED_FIELD
from tests.faults.checker import check, wait_idle
from tests.faults.harness import Stack

pytestmark = pytest.mark.integration

_FUZZ = settings(
    max_examples=int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    derandomize=os.environ.get("FAULTS_FUZZ_RANDOM") != "1",  # reproducible in make test
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = ["fuzz.item.made", "fuzz.a.b.c", "fault.ping.sent", "nobody.listens", "module.error"]
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_names = st.sampled_from(NAMES) | st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z][a-z0-9_]{0,6}){1,3}", fullmatch=True)


def _start(stack: Stack) -> None:
    stack.start_router("router", "--no-log-writer")
    stack.start_log_writer()
    stack.start_worker(queues="fa,fc")


@st.composite
def _envelopes(draw: st.DrawFn) -> bytes:
    """A valid envelope, sometimes mutated: fields replaced, dropped or added."""
    envelope: dict[str, Any] = {
        "event_id": str(draw(st.uuids())),
        "event_type": draw(st.sampled_from(NAMES)),
        "user_id": draw(st.none() | st.integers(0, 10**6) | st.text(max_size=8)),
        "data": draw(st.dictionaries(st.text(max_size=8), _json, max_size=3)),
        "timestamp": "2026-11-28T12:00:00+00:00",
        "module": "fuzz",
        "causation_id": None,
        "correlation_id": None,
        "hops": 0,
    }
    for key in draw(st.lists(st.sampled_from(sorted(envelope)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del envelope[key]
        else:
            envelope[key] = draw(_json)
    if draw(st.booleans()):
        envelope[draw(st.text(max_size=8))] = draw(_json)
    return json.dumps(envelope).encode()


_fields = st.dictionaries(
    st.sampled_from([b"e"]) | st.binary(max_size=12),
    _envelopes() | st.binary(max_size=300) | st.just(b"{}") | st.just(b"e" * 70_000),
    min_size=1,
    max_size=4,
)


@pytest.mark.timeout(180)
@pytest.mark.brokers
def test_fuzzed_stream_entries_are_dead_lettered_or_delivered_and_nothing_dies(stack: Stack) -> None:
    _start(stack)
    injected: dict[str, dict[bytes, bytes]] = {}
    seen: set[object] = set()

    @_FUZZ
    @given(fields=_fields)
    def inject(fields: dict[bytes, bytes]) -> None:
        try:
            event_id = json.loads(fields.get(b"e", b"")).get("event_id")
        except (ValueError, AttributeError):
            event_id = None
        if isinstance(event_id, str):
            if event_id in seen:  # two entries claiming one event_id would be one event twice
                reject()
            seen.add(event_id)
        entry_id = stack.redis.xadd(stack.keys.stream, fields)  # type: ignore[arg-type]
        injected[entry_id.decode()] = fields

    inject()
    wait_idle(stack)
    dead_lettered = {f.get(b"id", b"").decode() for _, f in stack.redis.xrange(stack.keys.dead_letter)}
    for entry_id, fields in injected.items():
        if entry_id in dead_lettered:
            continue
        # Not set aside, so it must have been a valid event: it counts as published.
        marked = fields.get(PUBLISHED_FIELD.encode()) == b"1"  # as the publish script writes it
        assert set(fields) == ({b"e", PUBLISHED_FIELD.encode()} if marked else {b"e"}), (
            f"entry {entry_id} {fields!r:.300} was neither dead-lettered nor an event"
        )
        envelope = json.loads(fields[b"e"])
        stack.published.setdefault(envelope["event_id"], envelope["event_type"])
    stack.publish("fault.ping.sent")  # and the router still dispatches
    check(stack, dead_letters=injected.keys())


_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates too
_valid_args = st.fixed_dictionaries(
    {
        "event_type": _names,
        "data": st.none() | st.dictionaries(_any_text, _json | _any_text, max_size=5),
        "user_id": st.none() | st.integers() | _any_text | st.uuids(),
        "module": st.none() | _any_text,
        "event_id": st.none() | st.uuids() | st.uuids().map(str),
    }
)
_any_args = st.fixed_dictionaries(
    {
        "event_type": _names | st.text(max_size=40) | st.none() | st.integers() | st.binary(max_size=10),
        "data": st.none()
        | st.dictionaries(st.text(max_size=10), _json, max_size=5)
        | st.dictionaries(st.text(max_size=5), _json, max_size=2).map(lambda d: {**d, "user_id": 7})
        | st.dictionaries(st.integers() | st.none() | st.tuples(st.integers()), _json, min_size=1, max_size=2)
        | st.dictionaries(st.text(max_size=5), st.sets(st.integers()) | st.binary() | st.builds(object), min_size=1)
        | st.lists(_json, max_size=3)
        | st.text(max_size=10)
        | st.just({"big": "x" * 70_000}),
        "user_id": st.none()
        | st.integers()
        | st.text(max_size=250)
        | st.uuids()
        | st.floats()
        | st.booleans()
        | st.lists(st.integers(), max_size=2),
        "module": st.none() | st.text(max_size=250) | st.integers(),
        "event_id": st.none()
        | st.uuids()
        | st.uuids().map(str)
        | st.uuids().map(lambda u: str(u).upper())
        | st.uuids().map(lambda u: u.hex)
        | st.text(max_size=40)
        | st.integers(),
    }
)
_publish_args = _valid_args | _any_args


def _args(**overrides: Any) -> dict[str, Any]:
    return {
        "event_type": "fuzz.item.made",
        "data": None,
        "user_id": None,
        "module": None,
        "event_id": None,
        **overrides,
    }


@pytest.mark.timeout(180)
def test_fuzzed_publish_calls_raise_a_typed_error_or_are_delivered_and_logged(stack: Stack) -> None:
    _start(stack)
    bus = stack.bus()
    outcomes = {"published": 0, "refused": 0}

    @_FUZZ
    @given(args=_publish_args)
    @example(args=_args(data={"s": "\ud800"}))  # a lone surrogate: valid in Python, not in JSONB
    @example(args=_args(data={"s": "\x00"}))  # NUL: PostgreSQL cannot store it
    @example(args=_args(data={"n": 2**80, "f": 1e308, "neg": -0.0}))
    @example(args=_args(user_id=2**70))
    @example(args=_args(module="m" * 250))
    @example(args=_args(event_id=str(uuid.uuid4()).upper()))
    def publish(args: dict[str, Any]) -> None:
        try:
            event_id = bus.publish_sync(
                args["event_type"],
                args["data"],
                user_id=args["user_id"],
                module=args["module"],
                event_id=args["event_id"],
            )
        except EventBusError:
            outcomes["refused"] += 1
            return
        except redis.RedisError as exc:  # pragma: no cover - reported by the assertion
            raise AssertionError(f"publish raised an untyped Redis error: {exc!r}") from exc
        outcomes["published"] += 1
        assert uuid.UUID(event_id)
        # The same event_id again is the same event (idempotent publish): the first type stands.
        stack.published.setdefault(event_id, args["event_type"])

    publish()
    print(f"fuzzed publish: {outcomes}")
    assert outcomes["published"] > 10, outcomes
    stack.publish("fault.ping.sent")
    check(stack)
