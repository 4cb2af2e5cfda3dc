"""RabbitMQ vhosts for one run: the benchmark's and the tests' (``tests/rabbitmq.py``).

Importing this module fixes no environment (it does not import :mod:`bench.harness`), so the
tests import it too, as they import :mod:`bench.redis_cluster`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["AMQP_URL", "amqp_vhost", "rabbitmqctl"]

#: The machine's RabbitMQ (guest/guest on the loopback); every run makes a vhost of its own on it.
AMQP_URL = os.environ.get("TEST_AMQP_URL") or os.environ.get("BENCH_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672"


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q`` with ``args``; return what it printed."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60).stdout


@contextmanager
def amqp_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost (guest may use it) for the block; its AMQP URL. Deleted afterwards."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)
