"""RabbitMQ for the tests that run Celery's queues on it: a vhost per test, and its queues' depth."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from project.broker import AmqpSender

__all__ = ["AMQP_URL", "BROKERS", "amqp_vhost", "queue_depth"]

# The machine's RabbitMQ; each test gets a vhost of its own on it, the AMQP counterpart of
# its own EVENTS_PREFIX.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60).stdout


@contextmanager
def amqp_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost (guest may use it) for one test; its AMQP URL. Deleted afterwards."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def queue_depth(settings: Any, queue: str) -> int:
    """Messages waiting on ``queue`` on RabbitMQ that no worker has taken (0: no such queue)."""
    sender = AmqpSender(settings)
    try:
        return sender.depth(queue) or 0
    finally:
        sender.close()
