"""Task messages a worker cannot read: kept in ``<prefix>:rejected-tasks``, never the worker's end.

The router builds every task message itself, but anything can push onto a Celery queue:
another producer, an operator's script, a half-written deploy. Celery and kombu refuse most
malformed messages with a log line. Some, though, raise where nothing catches them, and the
worker's main process logs ``Unrecoverable error`` and takes no more messages:

- a Redis queue entry that is not JSON, or not UTF-8: kombu decodes it in its ``BRPOP``
  reader, before any handler;
- JSON that is not kombu's envelope (a list, ``null``, headers or properties that are not
  objects): kombu's ``Message`` raises as it is built;
- headers that trip Celery's strategy (an id or task name that is a list, a time limit that
  is not a pair, no id at all).

:func:`apply` wraps each of those steps. A message that fails one is kept in the
rejected-tasks stream with ``malformed`` set, its reason, its queue and what arrived: the
raw entry, or its headers and body. Then it is acknowledged where it had been received, and
the worker goes on. ``eventbus requeue-rejected`` leaves malformed entries where they are
(they would fail again); ``list_rejected`` shows them. Connection and channel errors pass
through untouched, to Celery's reconnect path (but not ``KeyError``, which kombu counts as
one: see :func:`_broker_errors`).

If the stream cannot take the message (Redis is down), the worker logs it whole and goes on
as if it were kept: that log line is then all that is left of it. Left unacknowledged, it
would hold one of the worker's prefetch slots for as long as the channel lives, and a few
such messages would stop the worker taking any; sent back to the queue, it would come
straight back while Redis is down.

Messages Celery refuses by itself, with a log line, and drops (``task_rejected``: not a task
message, an ETA or expiry that is not a date, a content type it does not accept; and a body
it cannot decode) are kept the same way before they go.

On RabbitMQ only the third kind can arrive: AMQP frames always parse to headers and a body.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MALFORMED_FIELD", "Unreadable", "apply", "message_fields"]

log = logging.getLogger("eventbus.malformed")

#: Set ("1") on a rejected-tasks entry that holds a malformed message.
MALFORMED_FIELD = "malformed"
_KEPT_TEXT_MAX = 1_000_000  # a kept raw entry is cut here: the stream is not a dump for anything


class Unreadable:
    """A Redis queue entry kombu could not decode: its bytes or text, and why."""

    __slots__ = ("error", "raw")

    def __init__(self, raw: str | bytes, error: str) -> None:
        self.raw, self.error = raw, error


class _NotUtf8(str):
    """kombu's ``bytes_to_str`` of bytes that are not UTF-8: replaced text, the bytes kept."""

    raw: bytes


def apply() -> None:
    """Patch kombu's Redis decoding, its virtual receive, and Celery's task handler (idempotent)."""
    _tolerant_redis_decoding()
    _guard_virtual_receive()
    _guard_task_handler()


def _tolerant_redis_decoding() -> None:
    from kombu.transport import redis as kombu_redis

    if getattr(kombu_redis.loads, "_eventbus_patched", False):
        return
    original_loads: Callable[..., Any] = kombu_redis.loads
    original_bytes_to_str: Callable[[Any], Any] = kombu_redis.bytes_to_str

    def bytes_to_str(s: Any) -> Any:
        try:
            return original_bytes_to_str(s)
        except UnicodeDecodeError:
            text = _NotUtf8(bytes(s).decode("utf-8", "replace"))
            text.raw = bytes(s)
            return text

    def loads(s: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(s, _NotUtf8):
            return Unreadable(s.raw, "not UTF-8")
        try:
            return original_loads(s, *args, **kwargs)
        except Exception as exc:  # JSON's errors, and whatever kombu's object hook raises
            return Unreadable(s, f"not JSON: {type(exc).__name__}: {exc}")

    loads._eventbus_patched = True  # type: ignore[attr-defined]
    kombu_redis.loads = loads
    kombu_redis.bytes_to_str = bytes_to_str


def _guard_virtual_receive() -> None:
    """Keep what kombu's virtual channel cannot make a message of (Redis and other virtual brokers)."""
    from kombu.transport import virtual

    channel: Any = virtual.Channel
    if getattr(channel.basic_consume, "_eventbus_patched", False):
        return
    original_consume = channel.basic_consume

    def basic_consume(self: Any, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = original_consume(self, queue, no_ack, callback, consumer_tag, **kwargs)

        # kombu's own callback (build the message, note it unacknowledged, hand it on), with
        # the message checked between the first two steps: what fails there is the message's
        # fault; what fails after (the broker's connection) fails as it did.
        def on_raw_message(raw: Any) -> Any:
            if isinstance(raw, Unreadable):
                return _keep_raw(queue, raw)
            try:
                message = self.Message(raw, channel=self)
                _check_envelope(message)
            except Exception as exc:
                return _keep_raw(queue, raw, f"{type(exc).__name__}: {exc}")
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            return callback(message)

        self.connection._callbacks[queue] = on_raw_message
        return result

    basic_consume._eventbus_patched = True  # type: ignore[attr-defined]
    channel.basic_consume = basic_consume

    original_reject = getattr(virtual.Transport, "_reject_inbound_message", None)
    if original_reject is None:  # a kombu without it: a message for a queue no longer consumed is its own
        return

    def _reject_inbound_message(self: Any, raw: Any) -> None:
        # A message for a queue no longer consumed goes back; one that is no message is kept.
        if isinstance(raw, Unreadable):
            _keep_raw("", raw)
            return
        try:
            original_reject(self, raw)
        except _passed_through(self):
            raise
        except Exception as exc:
            _keep_raw("", raw, f"{type(exc).__name__}: {exc}")

    virtual.Transport._reject_inbound_message = _reject_inbound_message  # type: ignore[method-assign]


def _guard_task_handler() -> None:
    """Keep a message Celery's task handler raises on, and acknowledge it, on every broker;
    keep those Celery itself refuses and drops (``task_rejected``, a body it cannot decode)."""
    from celery import signals
    from celery.worker.consumer import consumer as celery_consumer

    cls: Any = celery_consumer.Consumer
    if getattr(cls.create_task_handler, "_eventbus_patched", False):
        return
    original = cls.create_task_handler

    def create_task_handler(self: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handler = original(self, *args, **kwargs)
        errors = _passed_through(self)

        def on_task_received(message: Any) -> Any:
            try:
                return handler(message)
            except errors:
                raise
            except Exception as exc:
                _refuse(message, exc, errors)
                return None

        return on_task_received

    original_decode_error = cls.on_decode_error

    def on_decode_error(self: Any, message: Any, exc: Exception) -> None:
        # Celery logs the message and acknowledges it (drops it): keep it first.
        _keep_message(message, f"refused by Celery: cannot decode its body: {type(exc).__name__}: {exc}")
        original_decode_error(self, message, exc)

    create_task_handler._eventbus_patched = True  # type: ignore[attr-defined]
    cls.create_task_handler = create_task_handler
    cls.on_decode_error = on_decode_error
    signals.task_rejected.connect(_on_rejected, weak=False, dispatch_uid="eventbus.malformed.rejected")


def _passed_through(owner: Any) -> tuple[type[BaseException], ...]:
    """The broker errors of a kombu transport or a Celery consumer that must reach Celery's reconnect."""
    errors = tuple(getattr(owner, "connection_errors", ())) + tuple(getattr(owner, "channel_errors", ()))
    return _broker_errors(errors)


def _broker_errors(errors: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    """The errors that mean the broker connection is broken: Celery reconnects on them.

    kombu counts ``KeyError`` among the Redis transport's connection errors; a message with
    no ``id`` header raises one too, and passed through it would have Celery reconnect,
    restore the message and receive it again, until the worker stops on too many restarts.
    """
    return tuple(e for e in errors if e is not KeyError)


def _check_envelope(message: Any) -> None:
    """Raise if kombu cannot note ``message`` unacknowledged: what its ``QoS.append`` reads."""
    info = message.delivery_info
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        raise ValueError(f"delivery_info {info!r} has no exchange and routing key")
    if not isinstance(message.delivery_tag, str | int) or isinstance(message.delivery_tag, bool):
        raise ValueError(f"delivery_tag {message.delivery_tag!r} is not a string")


def _keep_raw(queue: str, raw: Any, reason: str = "") -> None:
    """Keep a queue entry kombu could not make a message of: ``Unreadable`` (which says why),
    or what it decoded and why that failed."""
    if isinstance(raw, Unreadable):
        text = raw.raw.decode("utf-8", "replace") if isinstance(raw.raw, bytes) else raw.raw
        reason = raw.error
    else:
        try:
            text = json.dumps(raw, default=repr)
        except Exception:  # e.g. nested too deep
            text = repr(raw)
    _keep({"queue": queue, "raw": text[:_KEPT_TEXT_MAX]}, reason, text)


def _refuse(message: Any, exc: Exception, errors: tuple[type[BaseException], ...]) -> None:
    """Keep a message Celery's handler raised on (or log it whole), then acknowledge it."""
    _keep_message(message, f"{type(exc).__name__}: {exc}")
    if not message.acknowledged:  # also when not kept: see the module's docstring
        message.ack_log_error(log, errors)


def _on_rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    """Celery refused and dropped a message (not a task message, or an invalid one): keep it."""
    if message is not None:
        reason = "not a task message (no task header)" if exc is None else f"{type(exc).__name__}: {exc}"
        _keep_message(message, f"refused by Celery: {reason}")


def _keep_message(message: Any, reason: str) -> None:
    """Keep a received message (:func:`_keep`); log it if it cannot even be read."""
    try:
        fields = message_fields(message, limit=_KEPT_TEXT_MAX)
    except Exception:  # nothing about keeping a message may stop the worker's handling of it
        log.exception("could not read a malformed task message to keep it (%s)", reason)
        return
    _keep(fields, reason, f"headers {fields['headers']} body (base64) {fields['body']}")


def message_fields(message: Any, limit: int | None = None) -> dict[str, str]:
    """A received kombu message as a rejected-tasks entry holds it: task, id, queue, headers
    (JSON), body (base64) and content type; headers and body cut at ``limit`` if given."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    raw_body = message.body
    body = raw_body if isinstance(raw_body, bytes) else str(raw_body).encode("utf-8", "replace")
    delivery_info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return {
        "task": _str_or_empty(headers.get("task")),
        "id": _str_or_empty(headers.get("id")),
        "queue": _str_or_empty(delivery_info.get("routing_key")),
        "headers": json.dumps(headers, default=repr)[:limit],
        "body": base64.b64encode(body[:limit]).decode("ascii"),
        "content_type": _str_or_empty(message.content_type),
    }


def _str_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _keep(fields: dict[str, str], reason: str, whole: str) -> None:
    """XADD a malformed message to rejected-tasks; log it whole instead if that fails."""
    from project.events import event_bus

    reason = f"malformed task message: {reason}"[:2000]
    try:
        stream = event_bus.keys.rejected_tasks  # (the first use of the keys may ask Redis too)
        entry: dict[Any, Any] = {"task": "", "id": "", **fields}
        entry.update(reason=reason, at=f"{time.time():.6f}", **{MALFORMED_FIELD: "1"})
        event_bus.sync_client().xadd(stream, entry)
    except Exception:
        log.exception(
            "could not keep a malformed task message (%s); dropped, and this is all that is left of it: %s",
            reason,
            whole[:_KEPT_TEXT_MAX],
        )
        return
    log.error("%s on queue %r: kept in %s, not run", reason, fields.get("queue", ""), stream)
