"""Malformed stream entries and hostile task messages never stop the router or a worker."""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from project.messages import TaskMessage, build_task_message, delivery_task_id
from project.rejected import list_rejected, requeue_rejected
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.rabbitmq import BROKERS


def _valid(**overrides: object) -> dict[str, object]:
    envelope: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "user.birth_data.updated",
        "user_id": 1,
        "data": {},
        "timestamp": "2026-01-01T00:00:00+00:00",
        "module": "m",
        "causation_id": None,
        "correlation_id": None,
        "hops": 0,
    }
    envelope.update(overrides)
    return envelope


def _malformed_entries() -> list[dict[bytes | str, bytes | str]]:
    kinds: list[dict[bytes | str, bytes | str]] = [
        {"e": "{not json"},
        {"e": "[1, 2, 3]"},
        {"e": json.dumps(_valid(hops="three"))},
        {"e": json.dumps(_valid(hops=-1))},
        {"e": json.dumps(_valid(unknown_field=1))},
        {"e": json.dumps(_valid(event_type="Bad.Name"))},
        {"e": json.dumps(_valid(event_type="a.*.c"))},
        {"e": json.dumps(_valid(event_type="single"))},
        {"e": json.dumps(_valid(event_id="not-a-uuid"))},
        {"e": json.dumps(_valid(data=[1, 2]))},
        {"e": json.dumps(_valid(timestamp="yesterday"))},
        {"e": json.dumps(_valid(data={"blob": "x" * 200_000}))},
        {"e": json.dumps({"event_type": "user.created"})},
        {"e": b"\xff\xfe\x00binary"},
        {"other": "field"},
        {"e": json.dumps(_valid()), "extra": "field"},
        {"e": "null"},
        {"e": json.dumps(_valid(user_id={"nested": True}))},
        {"e": json.dumps(_valid(user_id=True))},
        {"e": "1e999999"},
        # NaN and Infinity are not JSON, though Python writes them and pydantic reads them.
        {"e": json.dumps(_valid(data={"kp": float("nan")}))},
        {"e": json.dumps(_valid(data={"deep": [{"x": float("-inf")}]}))},
    ]
    return [kinds[i % len(kinds)] for i in range(100)]


def test_malformed_entries_are_dead_lettered_and_the_router_keeps_going(stack: Stack) -> None:
    stack.start_worker(queues="alpha")
    stack.start_router()
    bus = stack.bus()
    keys = bus.keys
    ids = []
    for bad in _malformed_entries():
        stack.redis.xadd(keys.stream, bad)
        ids.append(bus.publish_sync("user.birth_data.updated", user_id="u1"))

    runs = stack.wait_runs(100)
    assert runs == {f"{i}:on_birth_data": 1 for i in ids}
    wait_for(lambda: stack.redis.xlen(keys.dead_letter) == 100, what="100 dead letters")
    for _, fields in stack.redis.xrange(keys.dead_letter):
        assert fields[b"reason"], fields
        assert fields[b"id"]
    reasons = {fields[b"reason"].decode() for _, fields in stack.redis.xrange(keys.dead_letter)}
    assert any("hops" in r for r in reasons) and any("event_type" in r for r in reasons)
    assert any("over the limit" in r for r in reasons)
    assert any("NaN or Infinity" in r for r in reasons)

    assert stack.procs["router"].poll() is None
    later = bus.publish_sync("user.birth_data.updated", user_id="u2")
    wait_for(lambda: stack.runs().get(f"{later}:on_birth_data") == 1, what="a later event")
    stack.settle()
    logged = stack.query("SELECT event_id::text FROM events_log")
    assert {r.event_id for r in logged} == {*ids, later}


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def test_pickled_message_is_refused_and_the_worker_keeps_working(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker(queues="alpha")
    marker = tmp_path / "pickle-ran"
    task_id = str(uuid.uuid4())
    message = json.loads(
        build_task_message(
            task_name="tests.integration.app.on_birth_data",
            task_id=task_id,
            queue="alpha",
            envelope_json="{}",
            event_type="user.birth_data.updated",
            event_id=task_id,
        )
    )
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    message["body"] = base64.b64encode(pickle.dumps(((_Exploit(str(marker)),), {}, {}))).decode()
    stack.redis.lpush(stack.bus().keys.celery_queue("alpha"), json.dumps(message))

    wait_for(
        lambda: "ContentDisallowed: Refusing to deserialize untrusted content of type pickle" in stack.log("worker"),
        what="the worker to refuse the pickled message",
    )
    assert not marker.exists()
    assert stack.procs["worker"].poll() is None

    stack.start_router()
    event_id = stack.bus().publish_sync("user.birth_data.updated", user_id="u1")
    wait_for(lambda: stack.runs().get(f"{event_id}:on_birth_data") == 1, what="a valid event after it")
    assert not marker.exists()
    assert stack.queue_length("alpha") == 0  # refused and removed, not redelivered forever


def test_task_arriving_again_after_success_is_skipped(stack: Stack) -> None:
    stack.start_worker(queues="alpha")
    envelope = _valid()
    handler = "tests.integration.app.on_birth_data"
    task_id = delivery_task_id(str(envelope["event_id"]), handler)
    queue_key = stack.bus().keys.celery_queue("alpha")

    def send() -> None:
        stack.redis.lpush(
            queue_key,
            build_task_message(
                task_name=handler,
                task_id=task_id,
                queue="alpha",
                envelope_json=json.dumps(envelope),
                event_type="user.birth_data.updated",
                event_id=str(envelope["event_id"]),
            ),
        )

    send()
    wait_for(lambda: stack.runs() == {f"{envelope['event_id']}:on_birth_data": 1}, what="first run")
    keys = stack.bus().keys
    wait_for(lambda: _state(stack, keys.delivery(task_id)) == b"done", what="the done mark")
    # The mark outlives the run by the done ttl: the start script gave the hash that plus the
    # hard time limit, and the done script left it.
    ttl, done_ttl = stack.redis.ttl(keys.delivery(task_id)), stack.settings.delivery_done_ttl_s
    assert done_ttl < ttl <= done_ttl + stack.settings.delivery_time_limit_s
    send()  # at once: the finished run's lease has not lapsed yet, and does not matter
    wait_for(lambda: "this copy is skipped" in stack.log("worker"), what="the copy to be skipped")
    assert "another copy holds the lease" not in stack.log("worker")  # skipped, not deferred
    assert stack.runs() == {f"{envelope['event_id']}:on_birth_data": 1}


def _state(stack: Stack, delivery_key: str) -> bytes | None:
    return stack.redis.hget(delivery_key, "state")  # type: ignore[return-value]


class _Delete:
    """A field :func:`_variant` removes."""


_DELETE = _Delete()


def _valid_task(task_id: str | None = None) -> dict[str, Any]:
    """A task message as the router writes it onto a Redis queue (kombu's JSON form)."""
    task_id = task_id or str(uuid.uuid4())
    return json.loads(
        build_task_message(
            task_name="tests.integration.app.on_birth_data",
            task_id=task_id,
            queue="alpha",
            envelope_json=json.dumps(_valid()),
            event_type="user.birth_data.updated",
            event_id=str(uuid.uuid4()),
        )
    )


def _variant(message: dict[str, Any], **changes: object) -> dict[str, Any]:
    """A copy of ``message`` with ``outer__inner`` fields set (or removed: ``_DELETE``)."""
    message = json.loads(json.dumps(message))
    for path, value in changes.items():
        *outer, last = path.split("__")
        target = message
        for part in outer:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return message


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _hostile_queue_entries() -> list[str | bytes]:
    """Entries on a Redis queue that no router wrote, from not JSON at all to headers Celery trips on."""
    good = _valid_task()

    def variant(**changes: object) -> str:
        fresh = _variant(good, properties__delivery_tag=str(uuid.uuid4()))  # kombu's tags are unique
        return json.dumps(_variant(fresh, **changes))

    return [
        "{not json",
        b"\xff\xfe not UTF-8",
        "[1, 2, 3]",
        "null",
        json.dumps("a string"),
        variant(headers="a string"),
        variant(headers=[1, 2]),
        variant(headers=_DELETE),
        variant(headers__id=["a", "list"]),
        variant(headers__id={"a": "dict"}),
        variant(headers__id=_DELETE),
        variant(headers__task=["a", "list"]),
        variant(headers__task="no.such.task"),
        variant(headers__eta="tomorrow"),
        variant(headers__expires="never"),
        variant(headers__timelimit="long"),
        variant(properties="a string"),
        variant(properties=_DELETE),
        variant(properties__delivery_info="a string"),
        variant(properties__delivery_tag=["x"]),
        variant(properties__body_encoding="rot13"),
        variant(body="%%% not base64 %%%"),
        variant(body=_b64(b"\xff\xfe binary")),
        variant(body=_b64(b"{}")),
        variant(**{"content-type": "application/x-yaml"}),
        variant(**{"content-type": ["json"]}),
    ]


def test_queue_entries_no_router_wrote_are_kept_and_never_stop_a_worker(stack: Stack) -> None:
    # Before, the first of these ended the worker's main process: "Unrecoverable error".
    stack.start_worker(queues="alpha")
    stack.start_router()
    bus = stack.bus()
    queue_key = bus.keys.celery_queue("alpha")
    hostile = _hostile_queue_entries()
    for i, raw in enumerate(hostile):
        stack.redis.lpush(queue_key, raw)
        event_id = bus.publish_sync("user.birth_data.updated", user_id=f"u{i}")
        wait_for(lambda e=event_id: stack.runs().get(f"{e}:on_birth_data") == 1, what=f"an event after {raw!r}")
        assert stack.procs["worker"].poll() is None, raw

    kept = list_rejected(bus)
    malformed = [r for r in kept if r.malformed]
    # Every entry is kept but the unknown task's (kept as before, not malformed).
    assert len(malformed) == len(hostile) - 1, [r.reason for r in kept]
    assert [r.task for r in kept if not r.malformed] == ["no.such.task"]
    raw_kept = {r.fields.get("raw") for r in malformed}
    assert {"{not json", "[1, 2, 3]", "null", '"a string"'} <= raw_kept
    assert "\ufffd\ufffd not UTF-8" in raw_kept  # bytes that are not UTF-8, as text
    not_json = next(r for r in malformed if r.fields.get("raw") == "{not json")
    assert not_json.queue == "alpha" and "not JSON" in not_json.reason
    id_list = [r for r in malformed if '"id": ["a", "list"]' in r.fields.get("headers", "")]
    assert len(id_list) == 1 and id_list[0].reason.startswith("malformed task message: TypeError")
    assert stack.queue_length("alpha") == 0
    assert not list(stack.redis.scan_iter(match="*unacked*")), "every entry was acknowledged"

    # Sending the kept messages again sends the unknown task's only: the malformed ones stay.
    sent = requeue_rejected(bus)
    assert [r.task for r in sent] == ["no.such.task"]
    assert len(list_rejected(bus)) == len(malformed)

    # An operator lists them, then deletes them.
    env = {**stack.env, "PATH": "/usr/bin:/bin"}
    listed = subprocess.run(
        [sys.executable, "-m", "project.cli", "rejected"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    lines = listed.stdout.splitlines()  # (and the unknown task's, if this worker refused it again already)
    assert len([line for line in lines if "  malformed  " in line]) == len(malformed)
    assert any("not JSON" in line and "queue='alpha'" in line for line in lines)
    subprocess.run(
        [sys.executable, "-m", "project.cli", "rejected", "--drop-malformed"], cwd=ROOT, env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    assert not any(r.malformed for r in list_rejected(bus))


@pytest.mark.brokers(*BROKERS)
def test_task_messages_celery_trips_on_are_kept_on_either_broker(stack: Stack) -> None:
    stack.start_worker(queues="alpha")
    stack.start_router()
    bus = stack.bus()
    headers = _valid_task()["headers"]
    body = json.dumps([[_valid()], {}, {}]).encode()
    cases = [
        ({"id": ["a", "list"]}, body),
        ({"task": ["a", "list"]}, body),
        ({"id": _DELETE}, body),
        ({"timelimit": "long"}, body),
        ({"expires": "never"}, body),
        ({}, b"{}"),
    ]
    for i, (changes, payload) in enumerate(cases):
        task_headers = _variant(headers, **changes)
        stack.send_copy(TaskMessage("alpha", str(uuid.uuid4()), payload, task_headers))
        event_id = bus.publish_sync("user.birth_data.updated", user_id=f"u{i}")
        wait_for(lambda e=event_id: stack.runs().get(f"{e}:on_birth_data") == 1, what=f"an event after {changes}")
        assert stack.procs["worker"].poll() is None, changes

    kept = list_rejected(bus)
    assert all(r.malformed for r in kept) and len(kept) == len(cases), [r.reason for r in kept]
    assert any('"id": ["a", "list"]' in r.fields["headers"] for r in kept)
    assert sorted(base64.b64decode(r.fields["body"]) for r in kept) == sorted(p for _, p in cases)
    assert stack.queue_length("alpha") == 0


@pytest.mark.brokers("rabbitmq")
def test_malformed_messages_that_cannot_be_kept_are_dropped_and_the_worker_goes_on_taking_messages(
    stack: Stack,
) -> None:
    # The events' Redis is unreachable from the worker (Celery's queues are on RabbitMQ):
    # left unacknowledged, each message would hold one of its two prefetch slots for good.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens once closed
    stack.start_worker(queues="alpha", REDIS_URL=nowhere)
    body = json.dumps([[_valid()], {}, {}]).encode()
    headers = _variant(_valid_task()["headers"], id=["a", "list"])
    for _ in range(3):
        stack.send_copy(TaskMessage("alpha", str(uuid.uuid4()), body, headers))
    wait_for(lambda: stack.queue_length("alpha") == 0, what="the worker to take all three (it has two prefetch slots)")
    wait_for(
        lambda: stack.log("worker").count("all that is left of it") == 3, what="all three logged whole and dropped"
    )
    assert stack.procs["worker"].poll() is None
