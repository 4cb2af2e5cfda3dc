"""Celery's queues on RabbitMQ: durable queues, publisher confirms, send first and acknowledge after.

The promises themselves (dispatch, retries, dead, module.error, crashes, redrive and replay)
run against both brokers in the modules marked ``brokers``; these tests cover what only
RabbitMQ has.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from project.broker import AmqpSender
from project.consumer import ensure_group
from project.keys import ROUTER_GROUP
from project.messages import FIRST_HEADER, delivery_task_id
from project.registry import Registry, Subscription
from project.router import Router
from tests.conftest import wait_for
from tests.integration.conftest import Stack

on_rabbitmq = pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)


def _queues(stack: Stack) -> dict[str, dict[str, str]]:
    """RabbitMQ's view of the test's vhost: name -> {durable, type, messages}."""
    vhost = stack.env["CELERY_BROKER_URL"].rsplit("/", 1)[1]
    out = subprocess.run(
        ["rabbitmqctl", "-q", "--formatter", "json", "list_queues", "-p", vhost, "name", "durable", "type", "messages"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {q["name"]: q for q in json.loads(out)}


def _pending(stack: Stack) -> int:
    return int(stack.redis.xpending(stack.bus().keys.stream, "router")["pending"])


@on_rabbitmq
def test_tasks_wait_on_durable_rabbitmq_queues_and_nothing_on_redis(stack: Stack) -> None:
    stack.start_router()
    bus = stack.bus()
    ids = [bus.publish_sync("user.birth_data.updated", {"n": i}) for i in range(5)]
    wait_for(lambda: stack.queue_length("alpha") == 5, what="5 tasks on RabbitMQ's alpha queue")
    alpha = _queues(stack)["alpha"]
    assert alpha["durable"] is True and alpha["type"] == "classic"
    # Nothing of Celery's in the event Redis: no queue list, no unacked hash.
    assert not list(stack.redis.scan_iter(match=f"{stack.prefix}:celery*"))
    assert stack.redis.exists(bus.keys.celery_queue("alpha")) == 0
    # Recorded dispatched only once confirmed; then run once each by a worker reading RabbitMQ.
    stack.settle()
    rows = stack.query("SELECT status, count(*) FROM event_deliveries GROUP BY status")
    assert dict(rows) == {"dispatched": 5}
    stack.start_worker(queues="alpha")
    assert stack.wait_runs(5) == {f"{i}:on_birth_data": 1 for i in ids}
    stack.wait_query(
        "SELECT count(*) FROM event_deliveries WHERE status = 'succeeded'", until=lambda rows: rows[0][0] == 5
    )
    assert "amqp://" in stack.log("worker")


@on_rabbitmq
def test_router_killed_between_confirm_and_acknowledge_sends_again_and_each_handler_runs_once(
    stack: Stack,
) -> None:
    keys = stack.bus().keys
    # The acknowledging script checks its keys' types before it writes anything; a log buffer
    # key of the wrong type makes it refuse, after the tasks were published and confirmed.
    # The router keeps its entries pending and retries the acknowledgement, without sending
    # the confirmed tasks again, until it is killed.
    stack.redis.set(keys.log_buffer, "in the way")
    bus = stack.bus()
    # Published first, so the router reads them as one batch: a refused batch holds back the
    # entries after it until Redis takes it.
    ids = [bus.publish_sync("user.birth_data.updated", {"n": i}) for i in range(20)]
    stack.start_worker(queues="alpha")
    router = stack.start_router("router-1")
    wait_for(lambda: len(stack.runs()) == 20, what="every handler to run from the confirmed sends")
    assert _pending(stack) == 20, "the entries were sent but must still be unacknowledged"
    wait_for(lambda: stack.log("router-1").count("EVENTBUS-KEYTYPE") >= 6, what="a few retries")
    assert "this copy is skipped" not in stack.log("worker"), "a retry sent confirmed tasks again"
    os.kill(router.pid, signal.SIGKILL)
    router.wait()
    stack.procs.pop("router-1")

    stack.redis.delete(keys.log_buffer)
    stack.start_router("router-2")  # takes the dead router's entries over and sends them again
    stack.settle()
    assert _pending(stack) == 0
    # Sent at least twice each; run once each (done markers skip the copies).
    wait_for(lambda: stack.queue_length("alpha") == 0, what="the copies to be consumed")
    assert stack.runs() == {f"{i}:on_birth_data": 1 for i in ids}
    rows = stack.wait_query(
        "SELECT status, count(*) FROM event_deliveries GROUP BY status",
        until=lambda rows: dict(rows).get("succeeded") == 20,
    )
    assert dict(rows) == {"succeeded": 20}
    assert stack.query("SELECT count(*) FROM events_log")[0][0] == 20


@on_rabbitmq
def test_a_send_rabbitmq_refuses_leaves_its_events_unacknowledged_until_it_is_confirmed(stack: Stack) -> None:
    vhost = stack.env["CELERY_BROKER_URL"].rsplit("/", 1)[1]
    # A full queue that refuses new messages: RabbitMQ nacks the publish.
    sender = AmqpSender(stack.settings)
    sender.declare(["alpha"])
    sender.close()
    subprocess.run(
        ["rabbitmqctl", "-q", "set_policy", "-p", vhost, "--apply-to", "queues", "full", "^alpha$",
         '{"max-length": 0, "overflow": "reject-publish"}'],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    bus = stack.bus()
    ids = [bus.publish_sync("user.birth_data.updated", {"n": i}) for i in range(3)]
    stack.start_router()  # reads the three as one batch
    wait_for(lambda: "RabbitMQ refused" in stack.log("router"), what="the router to see the nack")
    assert _pending(stack) == 3
    assert stack.query("SELECT count(*) FROM events_log")[0][0] == 0, "nothing is recorded before its confirm"

    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost, "full"], check=True, capture_output=True)
    stack.start_worker(queues="alpha")
    assert stack.wait_runs(3) == {f"{i}:on_birth_data": 1 for i in ids}
    stack.settle()
    assert _pending(stack) == 0


@on_rabbitmq
def test_quorum_queues_retry_with_a_countdown_and_end_dead_with_module_error(stack: Stack) -> None:
    stack.env["BROKER_QUORUM_QUEUES"] = "true"
    stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    flaky = bus.publish_sync("flaky.job.requested", {"fail_times": 2})
    doomed = bus.publish_sync("doomed.job.requested", {})
    stack.wait_query(
        "SELECT handler, status, attempts FROM event_deliveries WHERE event_id IN (:a, :b)",
        until=lambda rows: (
            {(r.handler.rsplit(".", 1)[-1], r.status) for r in rows} >= {("flaky", "succeeded"), ("doomed", "dead")}
        ),
        a=flaky,
        b=doomed,
        timeout_s=90,
    )
    gamma = _queues(stack)["gamma"]
    assert gamma["type"] == "quorum" and gamma["durable"] is True
    stack.wait_query(
        "SELECT count(*) FROM events_log WHERE event_type = 'module.error'", until=lambda rows: rows[0][0] >= 1
    )


@on_rabbitmq
def test_tasks_of_entries_read_again_or_taken_over_are_not_sent_as_first_copies(stack: Stack) -> None:
    # On RabbitMQ the router publishes, then acknowledges: an entry it reads again (after a
    # failed acknowledgement) or takes over may have had its tasks published already. They go
    # as ordinary copies, which a worker counts with its full start, not as first copies,
    # which it would start with a bare SET NX and count nowhere.
    registry = Registry()
    registry.add(Subscription(name="tests.rmq.on_item", patterns=("rmq.#",), handler=lambda e: None, queue="alpha",
                              module=None, max_retries=0, backoff_s=1.0, backoff_max_s=1.0))  # fmt: skip
    settings = stack.settings.model_copy(update={"router_claim_idle_ms": 100})
    bus, client, stream = stack.bus(), stack.redis, stack.bus().keys.stream
    router = Router(settings, registry, consumer="r1", client=client)

    def newest() -> tuple[str, object]:
        headers, _ = stack.newest("alpha")
        return str(headers["id"]), headers.get(FIRST_HEADER)

    try:
        ensure_group(client, stream, ROUTER_GROUP)
        new = bus.publish_sync("rmq.item.made", {"n": 1})
        assert router.loop.read_once(">", None) == 1
        assert newest() == (delivery_task_id(new, "tests.rmq.on_item"), 1)

        again = bus.publish_sync("rmq.item.made", {"n": 2})
        client.xreadgroup(ROUTER_GROUP, "r1", {stream: ">"})  # read by this router, not acknowledged
        assert router.loop.read_once("0", None) == 1
        assert newest() == (delivery_task_id(again, "tests.rmq.on_item"), None)

        taken = bus.publish_sync("rmq.item.made", {"n": 3})
        client.xreadgroup(ROUTER_GROUP, "gone", {stream: ">"})  # pending on a router that died
        time.sleep(0.2)
        router.loop.claim_abandoned()
        assert newest() == (delivery_task_id(taken, "tests.rmq.on_item"), None)

        later = bus.publish_sync("rmq.item.made", {"n": 4})
        assert router.loop.read_once(">", None) == 1
        assert newest() == (delivery_task_id(later, "tests.rmq.on_item"), 1)
        assert stack.queue_length("alpha") == 4
        assert client.xpending(stream, ROUTER_GROUP)["pending"] == 0
    finally:
        if router.sender is not None:
            router.sender.close()
