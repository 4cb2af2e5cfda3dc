"""Celery's queues on RabbitMQ: declared as Celery declares them, sent to with publisher confirms.

With ``CELERY_BROKER_URL`` an AMQP URL, a task can no longer go onto its queue in the same
Redis script that acknowledges its event. So the router sends first and acknowledges after:
it publishes a batch's tasks on one held channel, waits until RabbitMQ confirmed every one
of them (stored on a durable queue), and only then acknowledges the stream entries and
appends their records. A router that dies between the two leaves its entries pending; the
router that takes them over sends them again, with the same task ids, and the workers' done
markers and leases (project.delivery) run each handler's effect once.

Queues are declared the way a Celery worker declares a queue it was not configured with
(``task_create_missing_queues``): a durable queue with a direct exchange of the same name,
or a quorum queue with a topic exchange when ``BROKER_QUORUM_QUEUES`` is on, the exchange
Celery's native delayed delivery (retries with a countdown) binds to. A router and a worker
that disagreed would see RabbitMQ refuse the second declaration (PRECONDITION_FAILED).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import amqp
import kombu
import kombu.exceptions

from project.errors import EventBusError
from project.messages import TaskMessage
from project.settings import Settings

__all__ = ["AmqpSender", "BrokerError", "celery_queue", "sender_for"]

log = logging.getLogger("eventbus.broker")

# What a lost or refused connection to RabbitMQ raises, besides our own BrokerError.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    amqp.exceptions.AMQPError,
    kombu.exceptions.OperationalError,
)


class BrokerError(EventBusError):
    """RabbitMQ did not confirm every task of a send: the caller must not acknowledge its events."""


def celery_queue(settings: Settings, name: str) -> kombu.Queue:
    """The queue ``name`` as a Celery worker of these settings declares it on RabbitMQ."""
    if settings.broker_quorum_queues:
        return kombu.Queue(
            name, kombu.Exchange(name, "topic"), routing_key=name, queue_arguments={"x-queue-type": "quorum"}
        )
    return kombu.Queue(name, kombu.Exchange(name, "direct"), routing_key=name)


class AmqpSender:
    """Sends task messages to RabbitMQ on one held connection and channel, with publisher confirms.

    Not thread-safe: one per thread (the router has one). A send that fails closes the
    connection; the next send opens a new one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: kombu.Connection | None = None
        self._channel: Any = None
        self._declared: set[str] = set()
        self._unconfirmed: set[int] = set()
        self._refused: list[str] = []
        self._next_tag = 1

    def send(self, messages: Sequence[TaskMessage]) -> None:
        """Publish ``messages``; return once RabbitMQ confirmed every one, or raise :class:`BrokerError`."""
        if not messages:
            return
        try:
            self._send(messages)
        except CONNECTION_ERRORS as exc:
            self.close()  # a channel in an unknown state is not reused
            where = kombu.Connection(self.settings.broker_url).as_uri()  # the password masked
            raise BrokerError(f"RabbitMQ at {where}: {exc!r}") from exc
        except BaseException:
            self.close()
            raise

    def depth(self, queue: str) -> int | None:
        """How many messages ``queue`` holds that no worker has taken yet (None: it does not exist)."""
        try:
            channel = self._open()
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
            return int(count)
        except amqp.exceptions.NotFound:
            self.close()  # RabbitMQ closed the channel
            return None

    def purge(self, queue: str) -> int:
        """Drop every message waiting on ``queue`` (declaring it first); return how many went."""
        self.declare([queue])
        return int(self._channel.queue_purge(queue) or 0)

    def declare(self, queues: Iterable[str]) -> None:
        """Declare ``queues`` (once each per connection), as a worker would."""
        channel = self._open()
        for name in queues:
            if name not in self._declared:
                celery_queue(self.settings, name)(channel).declare()
                self._declared.add(name)

    def close(self) -> None:
        """Close the connection (if any); the next send opens a new one."""
        connection, self._connection, self._channel = self._connection, None, None
        self._declared.clear()
        if connection is not None:
            try:
                connection.close()
            except Exception:  # already broken: nothing more to release
                log.debug("broker: closing a broken connection failed", exc_info=True)

    def _open(self) -> Any:
        if self._channel is not None:
            return self._channel
        connection = kombu.Connection(self.settings.broker_url, connect_timeout=5)
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._connection, self._channel = connection, channel
        self._unconfirmed.clear()
        self._next_tag = 1
        return channel

    def _send(self, messages: Sequence[TaskMessage]) -> None:
        self.declare({m.queue for m in messages})
        channel = self._channel
        self._refused = []
        queues: dict[str, Any] = {}
        for m in messages:
            queue = queues.get(m.queue) or queues.setdefault(m.queue, celery_queue(self.settings, m.queue))
            message = channel.prepare_message(
                m.body,
                0,
                "application/json",
                "utf-8",
                m.headers,
                m.amqp_properties(),
            )
            # mandatory: a message no queue takes comes back (basic.return) instead of vanishing.
            channel.basic_publish(message, exchange=queue.exchange.name, routing_key=m.queue, mandatory=True)
            self._unconfirmed.add(self._next_tag)
            self._next_tag += 1
        self._wait_for_confirms(len(messages))

    def _wait_for_confirms(self, sent: int) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + self.settings.broker_confirm_timeout_s
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"RabbitMQ confirmed {sent - len(self._unconfirmed)} of {sent} tasks within "
                    f"BROKER_CONFIRM_TIMEOUT_S={self.settings.broker_confirm_timeout_s:g}s"
                )
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
        if self._refused:
            raise BrokerError(f"RabbitMQ refused {len(self._refused)} of {sent} tasks: {'; '.join(self._refused[:3])}")

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > delivery_tag}
        else:
            self._unconfirmed.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._refused.append(f"nack of delivery tag {delivery_tag}{' and before' if multiple else ''}")
        self._on_ack(delivery_tag, multiple)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._refused.append(f"returned from exchange {exchange!r} with routing key {routing_key!r}: {exc}")


def sender_for(settings: Settings) -> AmqpSender | None:
    """An :class:`AmqpSender` when Celery's queues are on RabbitMQ, else None (they are in Redis)."""
    return AmqpSender(settings) if settings.broker_is_amqp else None
