"""RabbitMQ for the tests that run Celery's queues on it: a vhost per test, and its queues' depth."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from project.broker import AmqpSender

__all__ = ["AMQP_URL", "BROKERS", "amqp_vhost", "broker", "pytest_generate_tests", "queue_depth"]

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


# Both suites' conftests import these two: a test marked ``brokers`` runs on each broker.
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``brokers`` runs once with Celery's queues in Redis and once on RabbitMQ."""
    if metafunc.definition.get_closest_marker("brokers") and "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", BROKERS, indirect=True)


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str:
    """Where the test's Celery queues live: ``redis`` (the default) or ``rabbitmq``."""
    return str(getattr(request, "param", "redis"))
