"""Golden test: the task messages the router builds are the ones Celery and kombu would store.

``project.messages`` writes Celery task messages by hand, in the form kombu's Redis transport
keeps them in a queue's list, so that the router can LPUSH them inside its dispatch script.
Nothing else would notice if a Celery or kombu upgrade changed that form until workers
misread tasks. So here the same task (name, id, queue, the envelope as its one argument) is
sent through Celery itself, configured by the project's ``celeryconfig``, onto a private key
prefix of the real Redis, and the JSON kombu stored is compared with ours field by field.

Only what must differ is compared by shape: kombu's delivery tag (a fresh UUID per message),
``origin`` (the sender's node name) and ``argsrepr`` (ours abbreviates the envelope). Needs
Redis, nothing else; skipped when no Redis answers.

Every test runs twice: for an event published outside a span, and for one published inside
a span, whose message also carries the W3C trace context in the headers ``traceparent`` and
``tracestate``, as Celery sends a task whose headers Celery's OpenTelemetry instrumentation
filled in (it adds them to the headers of ``before_task_publish``; Celery sends those).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app.task import Context
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.celery import celery_getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from project.envelope import encode_envelope
from project.keys import Keys
from project.messages import build_task_message, delivery_task_id

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TASK = "handlers.wire.WireModule.on_event"
QUEUE = "wire"
EVENT_TYPE = "wire.format.checked"
# Non-ASCII, nested and null values: the body must decode to the same JSON, not just look alike.
DATA = {"user_id": 42, "city": "Zürich ☀", "kp": [5, 6.5, None], "nested": {"ok": True}}

HEADERS = (
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit", "root_id",
    "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting", "stamped_headers",
    "stamps",
)  # fmt: skip
# The context of the publishing span, as an envelope published inside it carries it.
TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=opaque"}
# Compared by shape in their own tests: they differ per message or per sender.
SHAPE_ONLY_HEADERS = frozenset({"argsrepr", "origin"})
PROPERTIES = ("correlation_id", "delivery_mode", "priority", "body_encoding")


@dataclass(frozen=True)
class Sent:
    """The same task as stored by Celery + kombu and as built by ``project.messages``."""

    celery: dict[str, Any]
    ours: dict[str, Any]
    ours_json: str
    envelope: dict[str, Any]
    trace: dict[str, str]  # the trace fields of the envelope, and so of the headers
    task_id: str
    queue_keys: list[str]  # the lists kombu pushed to, under the private prefix
    keys: Keys
    app: Celery
    client: redis.Redis


@pytest.fixture(scope="module", params=["untraced", "traced"])
def sent(request: pytest.FixtureRequest) -> Iterator[Sent]:
    trace_fields = TRACE if request.param == "traced" else {}
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"no Redis at {REDIS_URL} ({exc})")
    keys = Keys(f"wiretest-{uuid.uuid4().hex}")
    app = Celery("wiretest", set_as_current=False)
    # The project's own Celery configuration (serializer, routes, transport options), with
    # the broker's keys moved under the private prefix the same way EVENTS_PREFIX moves them.
    app.config_from_object("celeryconfig")
    app.conf.broker_url = REDIS_URL
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "global_keyprefix": keys.celery_keyprefix,
    }
    try:
        with _inside_span(trace_fields):
            event_id, envelope_json = encode_envelope(
                EVENT_TYPE, DATA, user_id=None, module="wire", max_bytes=64 * 1024, max_hops=16
            )
        envelope = json.loads(envelope_json)
        assert {k: envelope[k] for k in TRACE if k in envelope} == trace_fields
        task_id = delivery_task_id(event_id, TASK)
        # The task sent by name, as the router does: its id and queue, results ignored, no
        # countdown. No time limits in the message: with [None, None] the worker applies the
        # task's own, and the router does not know them (apply_async of the registered task
        # would copy them into "timelimit").
        # Celery's instrumentation injects the trace context into the headers it is handed
        # in before_task_publish; headers given here land in the same dict, the same way.
        headers = dict(trace_fields) or None
        app.send_task(TASK, args=[envelope], task_id=task_id, queue=QUEUE, ignore_result=True, headers=headers)
        queue_keys = sorted(
            k.decode() for k in client.scan_iter(match=f"{keys.celery_keyprefix}*") if client.type(k) == b"list"
        )
        stored: Any = client.lrange(keys.celery_queue(QUEUE), 0, -1)
        assert len(stored) == 1, f"kombu stored {len(stored)} messages under {keys.celery_queue(QUEUE)}"
        ours = build_task_message(
            task_name=TASK,
            task_id=task_id,
            queue=QUEUE,
            envelope_json=envelope_json,
            event_type=EVENT_TYPE,
            event_id=event_id,
            traceparent=envelope.get("traceparent"),
            tracestate=envelope.get("tracestate"),
        )
        yield Sent(
            celery=json.loads(stored[0]),
            ours=json.loads(ours),
            ours_json=ours,
            envelope=envelope,
            trace=dict(trace_fields),
            task_id=task_id,
            queue_keys=queue_keys,
            keys=keys,
            app=app,
            client=client,
        )
    finally:
        app.close()
        for key in client.scan_iter(match=f"{keys.prefix}:*"):
            client.delete(key)
        client.close()


@contextmanager
def _inside_span(fields: dict[str, str]) -> Iterator[None]:
    """Make the span ``fields`` describe current (no SDK needed), as it is inside publish's span."""
    if not fields:
        yield
        return
    parent = TraceContextTextMapPropagator().extract(fields)
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def _body(message: dict[str, Any]) -> Any:
    assert message["properties"]["body_encoding"] == "base64"
    raw = base64.b64decode(message["body"], validate=True)
    return json.loads(raw.decode(message["content-encoding"]))


def test_kombu_stores_the_task_in_the_list_the_router_pushes_to(sent: Sent) -> None:
    # The router LPUSHes onto Keys.celery_queue(queue): it must be the (priority 0) list kombu reads.
    assert sent.queue_keys == [sent.keys.celery_queue(QUEUE)]


def test_the_message_has_the_same_fields_at_every_level(sent: Sent) -> None:
    celery, ours = sent.celery, sent.ours
    assert sorted(ours) == sorted(celery)
    assert sorted(ours["headers"]) == sorted(celery["headers"])
    assert sorted(ours["properties"]) == sorted(celery["properties"])
    assert sorted(ours["properties"]["delivery_info"]) == sorted(celery["properties"]["delivery_info"])
    # Every header this test knows, so a field added upstream is noticed above, not ignored.
    assert sorted(celery["headers"]) == sorted(HEADERS + tuple(sent.trace))


def test_the_fields_come_in_celerys_order(sent: Sent) -> None:
    # Not needed by any reader, but with the same order and values the JSON differs from
    # kombu's only in what differs per message or sender (tag, origin, argsrepr, reply_to).
    celery, ours = sent.celery, sent.ours
    assert list(ours) == list(celery)
    assert list(ours["headers"]) == list(celery["headers"])
    assert list(ours["properties"]) == list(celery["properties"])


def test_the_trace_context_is_in_the_headers_only_when_the_envelope_has_one(sent: Sent) -> None:
    for message in (sent.celery, sent.ours):
        assert {
            k: message["headers"][k] for k in ("traceparent", "tracestate") if k in message["headers"]
        } == sent.trace


def test_celerys_instrumentation_reads_the_publishers_context_from_the_request(sent: Sent) -> None:
    # The worker copies every header onto task.request; Celery's instrumentation extracts
    # its parent from there (celery_getter) when the task starts.
    parent = trace.get_current_span(
        TraceContextTextMapPropagator().extract(Context(sent.ours["headers"]), getter=celery_getter)
    ).get_span_context()
    if not sent.trace:
        assert not parent.is_valid
        return
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == tuple(sent.trace["traceparent"].split("-")[1:3])
    assert parent.is_remote
    assert parent.trace_state.to_header() == sent.trace["tracestate"]


def test_content_type_and_encoding_are_celerys(sent: Sent) -> None:
    for field in ("content-type", "content-encoding"):
        assert sent.ours[field] == sent.celery[field], field


@pytest.mark.parametrize("header", [h for h in HEADERS if h not in SHAPE_ONLY_HEADERS])
def test_every_fixed_header_equals_celerys(sent: Sent, header: str) -> None:
    assert sent.ours["headers"][header] == sent.celery["headers"][header]


def test_the_task_is_named_and_identified_as_celery_does(sent: Sent) -> None:
    headers = sent.celery["headers"]
    assert (headers["task"], headers["id"], headers["root_id"]) == (TASK, sent.task_id, sent.task_id)
    assert headers["ignore_result"] is True


def test_argsrepr_is_a_short_repr_of_the_one_envelope_argument(sent: Sent) -> None:
    ours, theirs = sent.ours["headers"]["argsrepr"], sent.celery["headers"]["argsrepr"]
    for text in (ours, theirs):
        assert isinstance(text, str)
        assert len(text) <= sent.app.amqp.argsrepr_maxsize
        # A one-element sequence holding a dict (Celery reprs the list it was given, ours a tuple).
        assert text[:2] in ("[{", "({") and text[-2:] in ("}]", ",)")
        assert repr(sent.envelope["event_id"]) in text
        assert repr(EVENT_TYPE) in text


def test_origin_is_a_node_name_on_this_host(sent: Sent) -> None:
    ours, theirs = sent.ours["headers"]["origin"], sent.celery["headers"]["origin"]
    our_name, _, our_host = ours.partition("@")
    their_name, _, their_host = theirs.partition("@")
    assert our_name and their_name
    assert our_host == their_host == socket.gethostname()


@pytest.mark.parametrize("prop", PROPERTIES)
def test_every_fixed_property_equals_celerys(sent: Sent, prop: str) -> None:
    assert sent.ours["properties"][prop] == sent.celery["properties"][prop]


def test_the_task_is_routed_to_its_queue_as_kombu_routes_it(sent: Sent) -> None:
    ours, theirs = sent.ours["properties"]["delivery_info"], sent.celery["properties"]["delivery_info"]
    assert ours == theirs == {"exchange": "", "routing_key": QUEUE}


def test_every_message_carries_its_own_delivery_tag(sent: Sent) -> None:
    ours, theirs = sent.ours["properties"]["delivery_tag"], sent.celery["properties"]["delivery_tag"]
    # kombu's Redis transport tracks unacknowledged messages by this tag: a fresh UUID each.
    assert str(uuid.UUID(ours)) == ours
    assert str(uuid.UUID(theirs)) == theirs
    assert ours != theirs


def test_the_body_decodes_to_the_same_args_kwargs_and_embed(sent: Sent) -> None:
    ours, theirs = _body(sent.ours), _body(sent.celery)
    assert ours == theirs
    args, kwargs, embed = ours
    assert args == [sent.envelope]
    assert kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_kombu_reads_our_message_back_as_the_same_task(sent: Sent) -> None:
    queue_key = sent.keys.celery_queue(QUEUE)
    sent.client.delete(queue_key)
    sent.client.lpush(queue_key, sent.ours_json)
    with sent.app.connection_for_read() as conn, conn.SimpleQueue(QUEUE, no_ack=True) as queue:
        message = queue.get(timeout=5)
    assert message.headers == sent.ours["headers"]
    assert message.payload == [[sent.envelope], {}, _body(sent.celery)[2]]
    assert message.properties["correlation_id"] == sent.task_id
    assert message.delivery_info["routing_key"] == QUEUE
    assert sent.client.llen(queue_key) == 0


def test_reply_to_has_the_shape_celery_gives_it(sent: Sent) -> None:
    ours, theirs = sent.ours["properties"]["reply_to"], sent.celery["properties"]["reply_to"]
    # Celery's is app.thread_oid, which differs per sending process and thread: compare shape.
    assert str(uuid.UUID(theirs)) == theirs
    assert str(uuid.UUID(ours)) == ours


@pytest.mark.parametrize("handler", ["handlers.lunar.LunarModule.recalculate", "", "mödule.hàndler.√", "a/b"])
def test_a_delivery_task_id_is_the_uuid5_of_the_event_id_and_handler(handler: str) -> None:
    # Written out by hand for speed; done markers and records are keyed by it across versions.
    namespace = uuid.UUID("6f0b0b8e-3c1a-4a5e-9d0c-9b3f3c8f1e21")
    for _ in range(200):
        event_id = str(uuid.uuid4())
        assert delivery_task_id(event_id, handler) == str(uuid.uuid5(namespace, f"{event_id}/{handler}"))
