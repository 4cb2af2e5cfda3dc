"""The exactly-once helpers: an effect and its events happen once, even if the process dies."""

from __future__ import annotations

import json

import pytest

from project.messages import delivery_task_id, task_message
from tests.conftest import wait_for
from tests.integration.conftest import Stack
from tests.rabbitmq import WITH_CLUSTER

pytestmark = pytest.mark.brokers(*WITH_CLUSTER)

DELIVERY = "SELECT status, attempts FROM event_deliveries WHERE event_id = :e AND handler = :h"
APP = "tests.integration.app"


@pytest.fixture
def effects_table(stack: Stack) -> Stack:
    engine = stack.engine()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE test_effects (id bigserial PRIMARY KEY, event_id uuid NOT NULL)")
    engine.dispose()
    return stack


def _published(stack: Stack, event_type: str) -> list[str]:
    entries = stack.redis.xrange(stack.bus().keys.scoped(event_type).stream)
    events = [json.loads(fields[b"e"]) for _, fields in entries]
    return [e["event_id"] for e in events if e["event_type"] == event_type]


def _effects_in_redis(stack: Stack, event_id: str) -> int:
    effects = f"{stack.bus().keys.scoped('once.redis.requested').prefix}:test:effects"  # Event.redis_key
    return int(stack.redis.hget(effects, f"{event_id}:once_in_redis") or 0)


@pytest.mark.parametrize("die_after_commit", [False, True])
def test_redis_effect_and_its_event_happen_once_even_if_the_process_dies_after_commit(
    effects_table: Stack, die_after_commit: bool
) -> None:
    stack = effects_table
    stack.start_worker(queues="gamma")
    bus = stack.bus()
    event_id = bus.publish_sync("once.redis.requested", {"die_after_commit": die_after_commit})
    stack.start_router()
    stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.once_in_redis")
    assert _effects_in_redis(stack, event_id) == 1
    assert stack.runs() == {f"{event_id}:once_in_redis": 1}  # the second copy was skipped on start
    wait_for(lambda: len(_published(stack, "once.redis.done")) == 1, what="the event published inside")
    if die_after_commit:
        assert "this copy is skipped" in stack.log("worker")

    # A copy arriving later (a redelivery) changes nothing.
    task_id = delivery_task_id(event_id, f"{APP}.once_in_redis")
    envelope = json.loads(stack.redis.xrange(bus.keys.scoped("once.redis.requested").stream, count=1)[0][1][b"e"])
    stack.send_copy(
        task_message(
            task_name=f"{APP}.once_in_redis", task_id=task_id, queue="gamma",
            envelope_json=json.dumps(envelope), event_type=envelope["event_type"], event_id=event_id,
        ),
    )  # fmt: skip
    wait_for(lambda: stack.log("worker").count("this copy is skipped") >= 1 + die_after_commit, what="copy skipped")
    assert _effects_in_redis(stack, event_id) == 1
    assert len(_published(stack, "once.redis.done")) == 1


@pytest.mark.parametrize("die_after_commit", [False, True])
def test_sql_effect_and_its_event_happen_once_even_if_the_process_dies_after_commit(
    effects_table: Stack, die_after_commit: bool
) -> None:
    stack = effects_table
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("once.sql.requested", {"die_after_commit": die_after_commit})
    row = stack.wait_query(
        DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.once_in_sql"
    )[0]
    assert stack.query("SELECT count(*) FROM test_effects WHERE event_id = :e", e=event_id)[0][0] == 1
    assert stack.query("SELECT count(*) FROM delivery_inbox WHERE event_id = :e", e=event_id)[0][0] == 1
    wait_for(lambda: len(_published(stack, "once.sql.done")) == 1, what="the event published inside")
    if die_after_commit:
        assert row.attempts == 2
        assert stack.runs() == {f"{event_id}:once_in_sql": 2}  # ran again, and committed nothing new
        assert "committed by an earlier copy" in stack.log("worker")
    else:
        assert stack.runs() == {f"{event_id}:once_in_sql": 1}
    stack.settle()
    assert len(_published(stack, "once.sql.done")) == 1


def test_a_first_copy_that_meets_a_committed_effect_sends_what_the_commit_kept_and_changes_nothing(
    stack: Stack,
) -> None:
    # A copy that committed its effect, then died before sending the events it kept (and
    # whose gate mark is gone): the next copy is a first copy, which starts without looking
    # at the hash. Its Event.redis_transaction finds the done mark under its WATCH, sends
    # the kept events and stops with AlreadyHandled; the effect is not applied again.
    stack.start_worker(queues="gamma")
    bus = stack.bus()
    event_id = bus.publish_sync("once.redis.requested", {})
    task_id = delivery_task_id(event_id, f"{APP}.once_in_redis")
    kept_id, kept = bus._encode("once.redis.done", {"of": event_id}, None, "tests", None, None)
    hash_key = bus.keys.scoped("once.redis.requested").delivery(task_id)
    stack.redis.hset(hash_key, mapping={"state": "done", "outbox": json.dumps([["once.redis.done", kept_id, kept]])})
    stack.start_router()
    wait_for(lambda: "committed by an earlier copy" in stack.log("worker"), what="the copy stopped at the done mark")
    assert stack.runs() == {f"{event_id}:once_in_redis": 1}
    assert _effects_in_redis(stack, event_id) == 0  # the MULTI never ran
    wait_for(lambda: _published(stack, "once.redis.done") == [kept_id], what="the kept event sent")
    assert stack.redis.hget(hash_key, "outbox") in (None, b"")
    stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.once_in_redis")
    stack.settle()
    assert _published(stack, "once.redis.done") == [kept_id]
