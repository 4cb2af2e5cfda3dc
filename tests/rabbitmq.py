"""RabbitMQ for the tests that run Celery's queues on it: a vhost per test, and its queues' depth."""

from __future__ import annotations

from typing import Any

import pytest

from bench.amqp import AMQP_URL, amqp_vhost
from project.broker import AmqpSender

# The machine's RabbitMQ (bench.amqp); each test gets a vhost of its own on it, the AMQP
# counterpart of its own EVENTS_PREFIX.

__all__ = ["AMQP_URL", "BROKERS", "WITH_CLUSTER", "amqp_vhost", "broker", "pytest_generate_tests", "queue_depth"]

BROKERS = ("redis", "rabbitmq")
#: ``@pytest.mark.brokers(*WITH_CLUSTER)``: on each broker, and with the events on a Redis Cluster.
WITH_CLUSTER = (*BROKERS, "cluster")


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
