"""A rolling deploy: the router knows a handler the running workers do not have yet."""

from __future__ import annotations

import pytest

from tests.faults.checker import Expect, check
from tests.faults.harness import Lab, wait_for
from tests.faults.routes import APP, APP_V2

pytestmark = pytest.mark.integration

BOTH = f"{APP},{APP_V2}"


@pytest.mark.timeout(120)
def test_task_for_a_handler_the_workers_lack_is_kept_then_requeued_and_runs_once(lab: Lab) -> None:
    stack = lab.stack()
    stack.start_router(EVENT_HANDLER_MODULES=BOTH)
    stack.start_worker("worker-old", queues="fa", concurrency=1)  # EVENT_HANDLER_MODULES=tests.faults.app
    event_id = stack.publish("deploy.feature.shipped", {"feature": "x"})
    sql = "SELECT status FROM event_deliveries WHERE event_id = :e"
    wait_for(lambda: [r.status for r in stack.query(sql, e=event_id)] == ["rejected"], what="the delivery rejected")
    kept = stack.redis.xrange(stack.keys.rejected_tasks)
    assert len(kept) == 1, kept
    fields = kept[0][1]
    assert fields.get(b"queue") == stack.keys.celery_queue("fa").encode() or fields.get(b"queue") == b"fa", fields
    assert any(event_id.encode() in value for value in fields.values()), "the raw message is not kept whole"
    assert stack.runs() == {}

    stack.stop("worker-old")  # the deploy replaces it
    stack.start_worker("worker-new", queues="fa", concurrency=1, EVENT_HANDLER_MODULES=BOTH)
    result = stack.run_tool("requeue-rejected")
    assert result.returncode == 0, result.stderr
    expect = {(event_id, "new_handler"): Expect("succeeded", runs=1)}
    check(stack, modules=(APP, APP_V2), expect=expect, rejected_tasks=1)
    # Requeueing again (an operator running it twice) must not run it a second time.
    assert stack.run_tool("requeue-rejected").returncode == 0
    wait_for(
        lambda: stack.queue_length("fa") == 0 and stack.unacked() == 0,
        what="whatever the second requeue sent to be consumed",
    )
    check(stack, modules=(APP, APP_V2), expect=expect, rejected_tasks=1)
    assert stack.runs() == {f"{event_id}:new_handler": 1}
