"""RabbitMQ, as Celery's broker, killed mid-stream and started again on its own data."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.faults.checker import check
from tests.faults.harness import Lab, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_rabbitmq_killed_mid_stream_then_restarted_loses_nothing_and_runs_nothing_twice(lab: Lab) -> None:
    """The node SIGKILLed while events flow: the router cannot get its confirms, so it keeps
    its entries pending and sends them again once the node is back; tasks RabbitMQ confirmed
    are on durable queues and come back with it; workers reconnect by themselves."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    node = lab.rabbitmq_node()
    stack = lab.stack(CELERY_BROKER_URL=node.url, RECONCILE_AFTER_S="20")
    stack.start_router()
    stack.start_worker(concurrency=2)
    rate = 40
    publisher = stack.publish_in_background("fault.work.done", 6 * rate, rate_per_s=rate)
    wait_for(lambda: len(publisher.ids) >= 2 * rate, timeout_s=30, what="events published")
    node.kill()
    down_at = len(publisher.ids)
    time.sleep(3)  # publishing goes on into Redis; nothing can be dispatched meanwhile
    assert len(publisher.ids) > down_at, "publish must not depend on the broker"
    node.start()
    publisher.join(60)
    # A handler running when the node died finishes, but cannot acknowledge its message:
    # its redelivered copy is skipped by the done marker, not run again.
    verdict = check(stack, kills=1, repeats_budget=2, timeout_s=120)
    print(f"RabbitMQ SIGKILL and restart: {verdict.line()}")
    # The router met the outage (and survived it: check() wants every process still running).
    assert "retrying in" in stack.log("router"), stack.log("router")[-2000:]
