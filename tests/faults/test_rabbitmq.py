"""RabbitMQ, as Celery's broker, killed mid-stream and started again on its own data."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.faults.checker import Expect, check
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


@pytest.mark.timeout(300)
def test_a_handler_outliving_rabbitmq_consumer_timeout_is_never_run_in_parallel(lab: Lab) -> None:
    """RabbitMQ's ``consumer_timeout`` (set far too low here) closes the channel of a worker
    whose handler runs on, and hands its message to another worker: that copy finds the lease
    held and is deferred until the first run ended, and is then skipped. Celery takes the
    closed channel for an unrecoverable error: the first worker finishes its task and exits
    (its supervisor starts it again). ``deploy/rabbitmq.conf`` sets the timeout to an hour so
    that none of this happens. RabbitMQ checks it about once a minute: the handler runs 75 s."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    node = lab.rabbitmq_node("consumer_timeout = 3000\n")
    stack = lab.stack(CELERY_BROKER_URL=node.url, DELIVERY_LEASE_S="2")
    stack.start_router()
    first = stack.start_worker("worker-1", queues="fa", concurrency=1)
    event_id = stack.publish("fault.long.requested", {"sleep_s": 75})
    wait_for(lambda: len(stack.busy()) == 1, timeout_s=30, what="the long handler running")
    stack.start_worker("worker-2", queues="fa", concurrency=1)
    first.must_live = False  # it ends once its channel is closed (see above)
    verdict = check(stack, expect={(event_id, "long_runner"): Expect("succeeded", runs=1, attempts=1)}, timeout_s=200)
    print(f"RabbitMQ consumer_timeout: {verdict.line()}")
    highest = {k.decode(): int(v) for k, v in stack.redis.hgetall(stack.test_key("max-running")).items()}
    assert highest == {event_id: 1}, f"copies of the delivery ran at once: {highest}"
    # The timeout fired and the message went to the other worker: the scenario proved something.
    assert "delivery acknowledgement on channel" in stack.log("worker-1"), stack.log("worker-1")[-3000:]
    assert re.search(r"long_runner\[[0-9a-f-]+\] received", stack.log("worker-2")), stack.log("worker-2")[-3000:]
