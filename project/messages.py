"""Celery task messages, built directly in the form Celery's Redis transport stores them.

The router writes these with LPUSH inside the same Lua script that acknowledges the stream
entry, which is what makes dispatch exactly-once: the send and the XACK happen together or
not at all. It also skips kombu's per-message client setup and ``saferepr`` of arguments,
which dominate the cost of ``apply_async`` (measured by ``make bench``, "dispatch").

The format is Celery's task protocol 2 inside kombu's virtual-transport envelope, the same
that ``app.amqp.as_task_v2`` + ``Channel._inplace_augment_message`` produce;
``tests/unit/test_wire_format.py`` compares the two field by field, and ``tests/integration``
runs these messages through real workers.

With Celery's queues on RabbitMQ, the same body and headers (:class:`TaskMessage`) are
published as an AMQP message instead (project.broker), with the properties Celery gives it.

An event published inside a span also carries its W3C trace context in the task headers, as
``traceparent`` / ``tracestate``: where Celery's OpenTelemetry instrumentation puts it when
it sends a task, and reads it back from ``task.request``. A worker instrumented that way
runs the task in a span of the publisher's trace instead of starting a trace of its own.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["FIRST_HEADER", "TaskMessage", "build_task_message", "delivery_task_id", "task_message", "wrap_message"]

# Fixed namespace: the same (event_id, handler) always gets the same task_id.
_TASK_NAMESPACE = uuid.UUID("6f0b0b8e-3c1a-4a5e-9d0c-9b3f3c8f1e21")
_NAMESPACE_BYTES = _TASK_NAMESPACE.bytes
_EMBED = '{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'
# The header of a delivery's first copy (see task_message); Celery makes it a request attribute.
FIRST_HEADER = "eventbus_first"
# The header of a copy that is to count an attempt no delivery hash holds (a first copy's,
# which counts itself nowhere; see project.delivery): UNCOUNTED_STARTED if that attempt
# started, UNCOUNTED_MAYBE if it may have (it counts, but never stops a delivery before an
# attempt surely ran).
UNCOUNTED_HEADER = "eventbus_uncounted"
UNCOUNTED_MAYBE, UNCOUNTED_STARTED = 1, 2
_ORIGIN = f"eventbus-router@{socket.gethostname()}"
# Celery sends its app's per-thread id here (only the rpc:// result backend reads it); one
# per process keeps the field the shape Celery gives it.
_REPLY_TO = str(uuid.uuid4())


def delivery_task_id(event_id: str, handler: str) -> str:
    """The Celery task id of the delivery of ``event_id`` to ``handler`` (deterministic).

    ``uuid.uuid5(_TASK_NAMESPACE, f"{event_id}/{handler}")``, written out: the router makes
    one per handler run, and the ``UUID`` object's construction and formatting were about
    three quarters of it.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{event_id}/{handler}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One Celery task message, before a broker's framing: what the Redis form and the AMQP form share."""

    queue: str
    task_id: str
    body: bytes
    headers: dict[str, Any]

    def amqp_properties(self) -> dict[str, Any]:
        """The AMQP message properties Celery sends a task with (content type and encoding aside)."""
        return {"correlation_id": self.task_id, "reply_to": _REPLY_TO, "delivery_mode": 2}

    def redis_form(self) -> str:
        """The JSON kombu's Redis transport keeps on the queue's list."""
        return wrap_message(self.body, self.headers, queue=self.queue, task_id=self.task_id)


def task_message(
    *,
    task_name: str,
    task_id: str,
    queue: str,
    envelope_json: str,
    event_type: str,
    event_id: str,
    traceparent: str | None = None,
    tracestate: str | None = None,
    first: bool = False,
    uncounted: bool = False,
) -> TaskMessage:
    """The Celery message that calls ``task_name(envelope)`` on ``queue``.

    ``envelope_json`` must already be validated JSON; it is embedded as the single argument.
    ``traceparent`` and ``tracestate``, the envelope's trace context, become headers of the
    same names (a ``tracestate`` only with a ``traceparent``, as the W3C propagator writes
    them); without them the message has exactly the headers Celery gives an untraced task.
    ``first``: the router's send of a delivery, which no copy precedes (but for a RabbitMQ
    resend of an unconfirmed batch, or a requeued rejected task, both the same message).
    Its header (:data:`FIRST_HEADER`) lets the worker start it with a bare ``SET NX`` of its
    lease (:mod:`project.delivery`); a broker that redelivers the message marks it
    redelivered, and that copy takes the full start. ``uncounted``: an attempt of the
    delivery may have run without being counted (a first copy whose worker was lost); the
    copy counts it as presumed (:data:`UNCOUNTED_HEADER`).
    """
    body = f"[[{envelope_json}],{{}},{_EMBED}]"
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": f"({{'event_type': {event_type!r}, 'event_id': {event_id!r}, ...}},)",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if first:
        headers[FIRST_HEADER] = 1
    if uncounted:
        headers[UNCOUNTED_HEADER] = UNCOUNTED_MAYBE
    if traceparent is not None:
        # Appended last, where Celery's propagator adds them to the headers it sends.
        headers["traceparent"] = traceparent
        if tracestate:
            headers["tracestate"] = tracestate
    return TaskMessage(queue, task_id, body.encode(), headers)


def build_task_message(**fields: Any) -> str:
    """:func:`task_message` in the form kombu's Redis transport stores (the JSON on the list)."""
    return task_message(**fields).redis_form()


def wrap_message(body: bytes, headers: dict[str, Any], *, queue: str, task_id: str) -> str:
    """Wrap a task's JSON ``body`` and ``headers`` in kombu's Redis envelope for ``queue``."""
    message = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": _REPLY_TO,
            "delivery_mode": 2,
            # The anonymous exchange routes by routing_key alone, also when kombu restores
            # an unacknowledged message, so no binding table entry is needed.
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return orjson.dumps(message).decode()
