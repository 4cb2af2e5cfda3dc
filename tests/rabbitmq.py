"""RabbitMQ for the tests that run Celery's queues on it: a vhost per test, and its queues' depth."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from project.broker import AmqpSender

__all__ = ["AMQP_URL", "BROKERS", "WITH_CLUSTER", "amqp_vhost", "broker", "pytest_generate_tests", "queue_depth"]

# The machine's RabbitMQ; each test gets a vhost of its own on it, the AMQP counterpart of
# its own EVENTS_PREFIX.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")
#: ``@pytest.mark.brokers(*WITH_CLUSTER)``: on each broker, and with the events on a Redis Cluster.
WITH_CLUSTER = (*BROKERS, "cluster")


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
    """A test marked ``brokers`` runs once with Celery's queues in Redis and once on RabbitMQ.

    ``@pytest.mark.brokers(*BROKERS, "cluster")`` adds a run with the events on a private
    3-master Redis Cluster and Celery's queues on RabbitMQ.
    """
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker and "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", marker.args or BROKERS, indirect=True)


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str:
    """Where the test's Celery queues live: ``redis`` (the default) or ``rabbitmq``; or
    ``cluster``: events on a Redis Cluster, Celery's queues on RabbitMQ."""
    return str(getattr(request, "param", "redis"))
