"""Handlers that kill their own process, overrun their time limit, or outlast the visibility timeout."""

from __future__ import annotations

import re
import time

import pytest

from tests.faults.checker import Expect, check, module_errors
from tests.faults.harness import Lab, Stack, wait_for
from tests.faults.routes import handler_name

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kills", "status", "attempts"),
    [(1, "succeeded", 2), (99, "dead", 3)],  # self_killer: max_retries=2, so 3 attempts at most
    ids=["stops-killing-itself", "always-kills-itself"],
)
@pytest.mark.brokers
def test_handler_killing_its_own_process_ends_succeeded_or_dead(
    stack: Stack, kills: int, status: str, attempts: int
) -> None:
    stack.start_router()
    stack.start_worker(queues="fc", concurrency=1)
    event_id = stack.publish("fault.suicide.requested", {"kills": kills}, user_id="u1")
    expect = {(event_id, "self_killer"): Expect(status, runs=attempts, attempts=attempts)}
    check(stack, expect=expect, timeout_s=60)
    reports = [e for e in module_errors(stack) if e["data"].get("event_id") == event_id]
    if status == "dead":
        assert len(reports) == 1, reports
        assert reports[0]["data"]["handler"] == handler_name("self_killer")
        assert reports[0]["data"]["attempts"] == attempts
        assert reports[0]["causation_id"] == event_id
        assert reports[0]["user_id"] == "u1"
    else:
        assert reports == []


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.brokers
def test_handler_past_its_time_limit_counts_an_attempt_and_runs_again(stack: Stack, mode: str) -> None:
    stack.start_router()
    stack.start_worker(queues="fc", concurrency=1)
    started = time.monotonic()
    event_id = stack.publish("fault.overrun.requested", {"mode": mode})
    check(stack, expect={(event_id, "overrunner"): Expect("succeeded", runs=2, attempts=2)}, timeout_s=60)
    # The first attempt was stopped at its 2 s limit, not allowed its 10 s.
    assert time.monotonic() - started < 9, "the time limit did not stop the first attempt"


@pytest.mark.timeout(120)
def test_handler_running_longer_than_the_visibility_timeout_never_runs_in_parallel(lab: Lab) -> None:
    stack = lab.stack(BROKER_VISIBILITY_TIMEOUT_S="4", DELIVERY_LEASE_S="1", DELIVERY_DONE_TTL_S="600")
    stack.start_router()
    stack.start_worker("worker-1", queues="fa", concurrency=2)
    ids = [stack.publish("fault.long.requested", {"sleep_s": 12}) for _ in range(2)]
    wait_for(lambda: len(stack.busy()) == 2, timeout_s=30, what="both long handlers running")
    # Past the visibility timeout kombu hands the still-running tasks out again; a worker
    # started now restores them as it starts, so a second copy of each surely exists.
    wait_for(lambda: stack.unacked_older_than(4), timeout_s=30, interval_s=0.2, what="the visibility timeout")
    stack.start_worker("worker-2", queues="fa", concurrency=2)
    check(stack, expect={(i, "long_runner"): Expect("succeeded", runs=1, attempts=1) for i in ids}, timeout_s=60)
    highest = {k.decode(): int(v) for k, v in stack.redis.hgetall(stack.test_key("max-running")).items()}
    assert highest == dict.fromkeys(ids, 1), f"copies of one delivery ran at once: {highest}"
    received = sum(
        len(re.findall(r"long_runner\[[0-9a-f-]+\] received", stack.log(name))) for name in ("worker-1", "worker-2")
    )
    assert received > len(ids), "no second copy was ever handed out: the scenario proved nothing"
