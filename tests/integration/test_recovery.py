"""Routers that crash, restart or run side by side dispatch each (event, handler) exactly once."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import Stack
from tests.rabbitmq import WITH_CLUSTER

pytestmark = pytest.mark.brokers(*WITH_CLUSTER)

EVENTS = 2000
HANDLERS = ("on_bulk", "on_bulk_item")  # queues beta and gamma


def _publish_in_background(stack: Stack, count: int, ids: list[str]) -> threading.Thread:
    bus = stack.bus()

    def run() -> None:
        for i in range(count):
            ids.append(bus.publish_sync("bulk.item.made", {"i": i}))
            if i % 20 == 0:
                time.sleep(0.01)  # a stream over seconds, so the router is often caught mid-batch

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _assert_each_sent_once_then_run_once(stack: Stack, ids: list[str]) -> None:
    assert len(set(ids)) == EVENTS
    stack.settle()
    # No worker yet: the queues hold what the routers sent. On Redis that is exactly one task
    # per delivery (sent and acknowledged in one script). On RabbitMQ a router that died
    # between its confirms and its acknowledgement leaves copies, which the workers skip.
    for queue in ("beta", "gamma"):
        if stack.settings.broker_is_amqp:
            assert stack.queue_length(queue) >= EVENTS
        else:
            assert stack.queue_length(queue) == EVENTS
    stack.start_worker()
    runs = stack.wait_runs(EVENTS * len(HANDLERS), timeout_s=120)
    assert runs == {f"{i}:{h}": 1 for i in ids for h in HANDLERS}
    rows = stack.wait_query(
        "SELECT status, count(*) AS n FROM event_deliveries GROUP BY status",
        until=lambda rows: dict(rows).get("succeeded") == EVENTS * len(HANDLERS),
        timeout_s=60,
    )
    assert dict(rows) == {"succeeded": EVENTS * len(HANDLERS)}
    logged = stack.query("SELECT count(*), count(DISTINCT event_id) FROM events_log")[0]
    assert tuple(logged) == (EVENTS, EVENTS)


def test_router_killed_with_sigkill_mid_batch_loses_and_doubles_nothing(stack: Stack) -> None:
    router = stack.start_router("router-1", ROUTER_BATCH_SIZE="20")
    consumer = f"{os.uname().nodename}-{router.pid}"
    ids: list[str] = []
    publisher = _publish_in_background(stack, EVENTS, ids)
    wait_for(lambda: len(ids) > EVENTS // 4, what="a quarter of the events published")

    # Freeze the router until it is caught holding entries it read but has not acknowledged.
    keys = stack.bus().keys.scoped("bulk.item.made")

    def caught_mid_batch() -> bool:
        os.kill(router.pid, signal.SIGSTOP)
        pending = {c["name"]: c["pending"] for c in stack.redis.xpending(keys.stream, "router")["consumers"]}
        if pending.get(consumer.encode(), pending.get(consumer, 0)):
            return True
        os.kill(router.pid, signal.SIGCONT)
        return False

    wait_for(caught_mid_batch, interval_s=0.001, what="the router mid-batch")
    os.kill(router.pid, signal.SIGKILL)
    router.wait()
    killed_at = len(ids)
    publisher.join()
    assert killed_at < EVENTS, "the router must die before every event was published"

    stack.start_router("router-2")  # a new consumer: takes over the dead one's entries
    _assert_each_sent_once_then_run_once(stack, ids)


def test_two_routers_dispatch_each_delivery_exactly_once(stack: Stack) -> None:
    # A claim threshold of 100 ms makes the two routers also take over each other's entries.
    stack.start_router("router-a", ROUTER_CLAIM_IDLE_MS="100", ROUTER_BATCH_SIZE="50")
    stack.start_router("router-b", "--no-log-writer", ROUTER_CLAIM_IDLE_MS="100", ROUTER_BATCH_SIZE="50")
    ids: list[str] = []
    _publish_in_background(stack, EVENTS, ids).join()
    _assert_each_sent_once_then_run_once(stack, ids)
    handled = []
    for name in ("router-a", "router-b"):
        assert stack.procs[name].poll() is None
        stack.stop(name)
        match = re.search(r"router stopped: RouterStats\(entries=(\d+)", stack.log(name))
        assert match, stack.log(name)
        handled.append(int(match.group(1)))
    assert sum(handled) == EVENTS
    assert min(handled) > 0, f"both routers must have shared the work: {handled}"
