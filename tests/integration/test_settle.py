"""A first copy's settle (``DeliveryTask._settle``): its done mark, its record and its
message's acknowledgement in one round trip, against a private Redis that a test then stops.

The worker-level behaviour (who sends what, over which connection) is in
``test_delivery_policy``; this pins down the task's side on its own: what it writes, when it
writes nothing, and that a Redis that fails leaves the mark and the acknowledgement to the
paths every other copy takes instead of failing the task (which would run its handler again).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from project.bus import EventBus
from project.delivery import ACKED_BY_POOL, DeliveryTask
from project.registry import Subscription
from project.settings import Settings
from tests.integration.redis_server import redis_server

pytestmark = pytest.mark.integration

INDEX, UNACKED = "celery:unacked_index", "celery:unacked"


def _task(bus: EventBus) -> DeliveryTask:
    """A delivery task as ``register_tasks`` makes one, in an app whose broker keeps kombu's keys under ``celery:``."""
    sub = Subscription(
        name="tests.settle.handler", patterns=("settle.#",), handler=lambda event: None, queue="q",
        module=None, max_retries=0, backoff_s=0.1, backoff_max_s=1.0,
    )  # fmt: skip
    app = Celery("settle", set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": "celery:"}
    attrs = {"name": sub.name, "subscription": sub, "bus": bus, "__module__": __name__}
    task: DeliveryTask = type("Delivery[settle]", (DeliveryTask,), attrs)()
    app.register_task(task)
    return task


def _offer(
    client: redis.Redis, task: DeliveryTask, bus: EventBus, task_id: str, keys: tuple[str, str] = (INDEX, UNACKED)
) -> str:
    """What the worker's main process and ``before_start`` leave for a first copy it leased on receipt."""
    tag = uuid.uuid4().hex
    client.zadd(INDEX, {tag: 1.0})
    client.hset(UNACKED, tag, "[]")
    client.set(bus.keys.lease(task_id), "a-token", px=60_000)
    task._attempts = (task_id, 1, True)
    task._ack = (task_id, [tag, *keys])
    return tag


def _event() -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": "settle.it.done", "data": {}}


def test_a_first_copy_is_marked_recorded_and_acknowledged_or_left_to_the_main_process(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        client = redis.Redis.from_url(url)
        keep = EventBus(Settings(redis_url=url, events_prefix="settle", log_buffer_full_policy="keep"))
        task = _task(keep)

        event = _event()
        tag = _offer(client, task, keep, "t1")
        assert task._settle("t1", event) == ACKED_BY_POOL
        lease = keep.keys.lease("t1")
        assert client.get(lease) == b"done" and client.ttl(lease) > 0
        assert client.zscore(INDEX, tag) is None and not client.hexists(UNACKED, tag)
        [(_, fields)] = client.xrange(keep.keys.log_buffer)
        record = json.loads(fields[b"r"])
        assert record[0] == "d" and record[2:6] == [event["event_id"], "tests.settle.handler", "succeeded", 1]
        assert task._ack is None  # used once

        # Not a first copy this process leased on receipt (before_start offered nothing), or
        # offered for another delivery: nothing written, for on_success and the main process to do.
        tag = _offer(client, task, keep, "t2")
        task._ack = None
        assert task._settle("t2", _event()) == "ok"
        tag3 = _offer(client, task, keep, "t3")
        assert task._settle("t4", _event()) == "ok"
        # A header naming other keys than the app's broker uses (not one this worker wrote).
        tag7 = _offer(client, task, keep, "t7", keys=("elsewhere:index", UNACKED))
        assert task._settle("t7", _event()) == "ok"
        for task_id in ("t2", "t3", "t7"):
            assert client.get(keep.keys.lease(task_id)) == b"a-token"
        assert all(client.hexists(UNACKED, t) and client.zscore(INDEX, t) for t in (tag, tag3, tag7))
        assert client.xlen(keep.keys.log_buffer) == 1

        # With the default policy a process' first record reads the buffer's length: the done script's job.
        shed = EventBus(Settings(redis_url=url, events_prefix="settle-shed"))
        task = _task(shed)
        tag = _offer(client, task, shed, "t5")
        assert task._settle("t5", _event()) == "ok"
        assert client.hexists(UNACKED, tag) and client.get(shed.keys.lease("t5")) == b"a-token"

        # Redis gone: no error out of the task, whose handler ran; "ok" sends it the usual way.
        task = _task(keep)
        _offer(client, task, keep, "t6")
        client.shutdown(nosave=True)
        assert task._settle("t6", _event()) == "ok"
