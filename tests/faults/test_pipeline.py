"""The dispatch and record pipeline under faults: a router frozen past its claim time, a log
writer SIGKILLed mid-batch, PostgreSQL refusing connections under load."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from project.keys import LOG_GROUP, ROUTER_GROUP
from tests.faults.checker import check, wait_idle
from tests.faults.harness import Lab, Stack, pg_admin, wait_for

pytestmark = pytest.mark.integration


def _freeze_when(stack: Stack, name: str, caught: Callable[[], bool]) -> None:
    """SIGSTOP process ``name`` at a moment ``caught()`` holds (thaw and retry otherwise)."""

    def frozen_in_the_act() -> bool:
        stack.send_signal(name, signal.SIGSTOP)
        if caught():
            return True
        stack.send_signal(name, signal.SIGCONT)
        return False

    wait_for(frozen_in_the_act, timeout_s=30, interval_s=0.001, what=f"{name} caught mid-batch")


def _pending_of(stack: Stack, stream: str, group: str, consumer: str | None = None) -> int:
    summary = stack.redis.xpending(stream, group)
    if consumer is None:
        return int(summary["pending"])
    for c in summary["consumers"] or []:
        if c["name"] in (consumer, consumer.encode()):
            return int(c["pending"])
    return 0


@pytest.mark.timeout(120)
def test_router_frozen_past_claim_idle_while_another_takes_over_dispatches_nothing_twice(lab: Lab) -> None:
    # No worker until the queues were counted, so the reconciler must not re-send meanwhile.
    stack = lab.stack(RECONCILE_AFTER_S="300", ROUTER_BATCH_SIZE="20")
    stack.start_router("router-a")
    stack.start_router("router-b", "--no-log-writer")
    publisher = stack.publish_in_background("fault.ping.sent", 600, rate_per_s=300)
    _freeze_when(stack, "router-a", lambda: _pending_of(stack, stack.keys.stream, ROUTER_GROUP, "router-a") > 0)
    frozen_at = time.monotonic()
    # router-b claims what router-a read once it has been idle ROUTER_CLAIM_IDLE_MS (1 s).
    wait_for(
        lambda: _pending_of(stack, stack.keys.stream, ROUTER_GROUP, "router-a") == 0,
        timeout_s=30,
        what="router-b to take over router-a's entries",
    )
    assert time.monotonic() - frozen_at > 1.0
    stack.send_signal("router-a", signal.SIGCONT)  # it wakes up holding a batch it no longer owns
    publisher.join()
    wait_idle(stack)
    assert stack.queue_length("fa") == len(stack.published), "an event was dispatched twice (or not at all)"
    stack.start_worker(queues="fa")
    check(stack)


@pytest.mark.timeout(120)
def test_log_writer_sigkilled_mid_batch_loses_and_doubles_no_record(stack: Stack) -> None:
    stack.start_router("router", "--no-log-writer")
    stack.start_log_writer("log-writer-1", LOG_BATCH_SIZE="50")
    stack.start_worker(queues="fa")
    publisher = stack.publish_in_background("fault.cache.done", 300, rate_per_s=150)
    _freeze_when(stack, "log-writer-1", lambda: _pending_of(stack, stack.keys.log_buffer, LOG_GROUP) > 0)
    stack.kill("log-writer-1")
    stack.start_log_writer("log-writer-2", LOG_BATCH_SIZE="50")  # takes over after LOG_CLAIM_IDLE_MS
    publisher.join()
    check(stack, kills=1)


@pytest.mark.timeout(150)
def test_postgresql_refusing_connections_under_load_delays_rows_and_loses_none(stack: Stack) -> None:
    stack.start_router()
    stack.start_worker(concurrency=2)
    publisher = stack.publish_in_background("fault.work.done", 90, rate_per_s=15)
    wait_for(lambda: stack.query("SELECT count(*) FROM events_log")[0][0] >= 10, what="the first rows")
    pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS false")
    try:
        pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{stack.database}'")
        refused_at = time.monotonic()
        published = len(stack.published)
        # Dispatch goes on while nothing can be written: deliveries run, rows wait in Redis.
        wait_for(lambda: len(stack.published) >= published + 40, timeout_s=30, what="publishing to go on")
        wait_for(lambda: time.monotonic() - refused_at >= 4, timeout_s=10)  # the outage lasts 4 s at least
    finally:
        pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS true")
    publisher.join()
    check(stack, timeout_s=90)
