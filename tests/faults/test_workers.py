"""Worker processes killed under load: a pool child mid-task, the main process with tasks prefetched."""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults.checker import check
from tests.faults.harness import Stack, children, pid_alive, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.brokers
def test_worker_child_killed_mid_task_loses_nothing_and_repeats_only_what_it_killed(stack: Stack) -> None:
    stack.start_router()
    worker = stack.start_worker(concurrency=2)
    publisher = stack.publish_in_background("fault.work.done", 24, rate_per_s=12, data={"sleep_s": 0.2})
    kills = 0
    for _ in range(3):
        victim = wait_for(lambda: stack.busy_child(worker), timeout_s=30, interval_s=0.01, what="a child mid-task")
        os.kill(victim, signal.SIGKILL)
        kills += 1
        stack.redis.hdel(stack.test_key("busy"), f"host:{victim}")
        wait_for(lambda v=victim: not pid_alive(v), timeout_s=10, what="the killed child to be gone")
    publisher.join()
    check(stack, kills=kills)


def test_worker_main_process_killed_with_tasks_prefetched_then_replaced(stack: Stack) -> None:
    stack.start_router()
    first = stack.start_worker("worker-1", concurrency=2, extra_args=("--prefetch-multiplier", "4"))
    for i in range(10):
        stack.publish("fault.work.done", {"sleep_s": 0.6, "n": i})

    def both_children_busy() -> bool:
        kids = set(children(first.pid))
        return sum(1 for w in stack.busy() if int(w.partition(":")[2]) in kids) == 2

    wait_for(both_children_busy, timeout_s=30, interval_s=0.01, what="both pool children mid-task")
    stack.kill("worker-1")  # the main process only: its children are orphaned mid-task
    vt = float(stack.env["BROKER_VISIBILITY_TIMEOUT_S"])
    # The messages it held (running and prefetched) stay unacknowledged until the visibility
    # timeout; a worker started after that restores them as it starts.
    wait_for(lambda: stack.unacked_older_than(vt), timeout_s=vt + 30, interval_s=0.2, what="the visibility timeout")
    stack.start_worker("worker-2", concurrency=2)
    check(stack, kills=1, repeats_budget=2)  # the two handlers running when it died


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_worker_main_process_killed_on_rabbitmq_hands_its_tasks_back_at_once(stack: Stack) -> None:
    # RabbitMQ requeues what a consumer held the moment its connection drops: no visibility
    # timeout to wait out, and the replacement may take them while the orphans still run.
    stack.start_router()
    first = stack.start_worker("worker-1", concurrency=2, extra_args=("--prefetch-multiplier", "4"))
    for i in range(10):
        stack.publish("fault.work.done", {"sleep_s": 0.6, "n": i})

    def both_children_busy() -> bool:
        kids = set(children(first.pid))
        return sum(1 for w in stack.busy() if int(w.partition(":")[2]) in kids) == 2

    wait_for(both_children_busy, timeout_s=30, interval_s=0.01, what="both pool children mid-task")
    stack.kill("worker-1")
    stack.start_worker("worker-2", concurrency=2)
    check(stack, kills=1, repeats_budget=2)  # the two handlers running when it died
