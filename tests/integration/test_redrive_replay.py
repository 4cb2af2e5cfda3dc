"""Redrive, replay and backfill from the record, on a real router, worker, Redis and PostgreSQL.

Each runs with Celery's queues in Redis, on RabbitMQ, and with the events on a Redis Cluster
(where a delivery's state, a replay's mark and the log buffer are those of the event's scope).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from project.messages import delivery_task_id
from project.operations import DeliveryFilter, ReplayFilter, backfill, redrive, replay
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.rabbitmq import WITH_CLUSTER

pytestmark = pytest.mark.brokers(*WITH_CLUSTER)

APP = "tests.integration.app"
DELIVERY = "SELECT status, attempts, redrives, redriven_at FROM event_deliveries WHERE event_id = :e AND handler = :h"


class StopAfter:
    """A progress display that stops the run after ``n`` items: an operator's Ctrl-C."""

    def __init__(self, stop: threading.Event, n: int) -> None:
        self.stop, self.n = stop, n

    def start(self, total: int) -> None: ...

    def advance(self, done: int, sent: int) -> None:
        if done >= self.n:
            self.stop.set()

    def close(self) -> None: ...


def _dead(stack: Stack, event_id: str, handler: str) -> None:
    stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "dead", e=event_id, h=f"{APP}.{handler}")


def _audit(stack: Stack) -> list[tuple[str, str, bool, str, int, int, int]]:
    rows = stack.query(
        "SELECT actor, operation, dry_run, outcome, selected, sent, skipped FROM operations_audit ORDER BY id"
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_redrive_sends_the_same_delivery_again_once_the_handler_is_fixed(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("fixable.job.requested", {"n": 1})
    _dead(stack, event_id, "fixable")
    stack.settle()
    flt = DeliveryFilter(handler=f"{APP}.fixable")

    dry = redrive(stack.settings, flt, dry_run=True, actor="ops")
    assert (dry.selected, dry.sent) == (1, 0) and dry.lines[0].startswith(f"would send {APP}.fixable")
    assert stack.queue_length("gamma") == 0

    stack.redis.set(f"{stack.prefix}:test:fixed", "1")
    result = redrive(stack.settings, flt, actor="ops")
    assert (result.selected, result.sent, result.skipped) == (1, 1, 0)
    row = stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.fixable")[
        0
    ]
    assert row.attempts == 2 and row.redrives == 1 and row.redriven_at is not None  # counted, not reset
    assert stack.runs() == {f"{event_id}:fixable": 1}
    # Its state in Redis is the one the workers keep, under the event's scope on a cluster.
    state = stack.bus().keys.scoped("fixable.job.requested").delivery(delivery_task_id(event_id, f"{APP}.fixable"))
    assert stack.redis.hget(state, "state") == b"done"
    assert redrive(stack.settings, flt, actor="ops").selected == 0  # nothing left to redrive
    assert _audit(stack) == [
        ("ops", "redrive", True, "finished", 1, 0, 0),
        ("ops", "redrive", False, "finished", 1, 1, 0),
        ("ops", "redrive", False, "finished", 0, 0, 0),
    ]


def test_redrive_interrupted_and_started_again_sends_nothing_twice(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    ids = [bus.publish_sync("fixable.job.requested", {"n": n}) for n in range(3)]
    for event_id in ids:
        _dead(stack, event_id, "fixable")
    stack.stop("worker")  # what is sent stays queued: a second send would show as a second message
    stack.settle()
    stack.redis.set(f"{stack.prefix}:test:fixed", "1")
    stop = threading.Event()
    flt = DeliveryFilter(handler=f"{APP}.fixable")  # not the app's always-failing module.error handler
    first = redrive(stack.settings, flt, stop=stop, progress=StopAfter(stop, 1), actor="ops")
    assert first.interrupted and first.sent == 1
    rows = stack.query("SELECT status FROM event_deliveries WHERE handler = :h", h=f"{APP}.fixable")
    assert sorted(r.status for r in rows) == ["dead", "dead", "dispatched"]  # the first one is in flight
    second = redrive(stack.settings, flt, actor="ops")
    assert (second.selected, second.sent, second.skipped) == (2, 2, 0)
    assert stack.queue_length("gamma") == 3
    stack.start_worker(queues="gamma")
    for event_id in ids:
        stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.fixable")
    assert stack.runs() == {f"{e}:fixable": 1 for e in ids}
    assert [a[3] for a in _audit(stack)] == ["interrupted", "finished"]


def _copies(stack: Stack) -> list[dict[str, object]]:
    return [json.loads(r) for r in stack.redis.lrange(f"{stack.prefix}:test:seen:on_birth_data", 0, -1)]


def test_replay_delivers_copies_recorded_as_replays_and_resumes_without_sending_twice(stack: Stack) -> None:
    stack.start_worker(queues="alpha")
    stack.start_router()
    bus = stack.bus()
    originals = [bus.publish_sync("user.birth_data.updated", {"n": n}, user_id=f"u{n}") for n in range(4)]
    wait_for(lambda: len(_copies(stack)) == 4, what="first deliveries")
    stack.settle()
    stack.stop("worker")
    flt = ReplayFilter(pattern="user.#", handler=f"{APP}.on_birth_data")
    stop = threading.Event()
    first = replay(stack.settings, flt, stop=stop, progress=StopAfter(stop, 2), actor="ops")
    assert first.interrupted and first.sent == 2
    second = replay(stack.settings, flt, actor="ops")
    assert (second.selected, second.sent, second.skipped) == (4, 2, 2)
    assert stack.queue_length("alpha") == 4  # one copy of each, never two
    stack.start_worker(queues="alpha")
    wait_for(lambda: len(_copies(stack)) == 8, what="the replayed deliveries")
    replays = [c for c in _copies(stack) if c.get("replay_of")]
    assert sorted(str(c["replay_of"]) for c in replays) == sorted(originals)
    assert {c["user_id"] for c in replays} == {f"u{n}" for n in range(4)}
    rows = stack.wait_query(
        "SELECT e.replay_of::text AS replay_of, d.status FROM events_log e JOIN event_deliveries d USING (event_id)"
        " WHERE e.replay_of IS NOT NULL",
        until=lambda r: len(r) == 4 and all(x.status == "succeeded" for x in r),
    )
    assert sorted(r.replay_of for r in rows) == sorted(originals)
    # Each copy is marked sent (in the scope of its event on a cluster).
    keys = stack.bus().keys.scoped("user.birth_data.updated")
    assert all(stack.redis.exists(keys.replayed(str(c["event_id"]))) for c in replays)
    # The same command once the run finished sends nothing; --again replays once more.
    assert replay(stack.settings, flt, actor="ops").sent == 0
    assert replay(stack.settings, flt, again=True, actor="ops").sent == 4


def test_backfill_feeds_a_handler_only_the_past_events_it_subscribes_to(stack: Stack) -> None:
    stack.start_router()
    bus = stack.bus()
    storm = bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
    bus.publish_sync("cosmic.full_moon", {"at": "2026-11-24"})
    bus.publish_sync("user.birth_data.updated", {"n": 0})
    stack.settle()
    handler = f"{APP}.on_any_detection"  # cosmic.*.detected
    before = stack.queue_length("alpha")
    result = backfill(stack.settings, handler, actor="ops")
    assert (result.operation, result.selected, result.sent) == ("backfill", 1, 1)
    assert stack.queue_length("alpha") == before + 1
    headers, body = stack.newest("alpha")
    assert headers["task"] == handler
    envelope = json.loads(body)[0][0]
    assert envelope["replay_of"] == storm and envelope["event_type"] == "cosmic.solar_storm.detected"
    assert headers["id"] == delivery_task_id(envelope["event_id"], handler)


def test_the_commands_print_a_dry_run_and_refuse_an_unknown_handler(stack: Stack) -> None:
    bus = stack.bus()
    bus.publish_sync("user.birth_data.updated", {"n": 0})
    stack.start_router()
    stack.settle()
    env = {**os.environ, **stack.env}
    run = subprocess.run(
        [sys.executable, "-m", "project.cli", "replay", "--pattern", "user.#", "--dry-run", "--actor", "cli-test"],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "would replay user.birth_data.updated" in run.stdout and "(dry run: nothing sent)" in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "project.cli", "backfill", "no.such.handler"],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "no handler 'no.such.handler' is subscribed" in bad.stderr
    assert ("cli-test", "replay", True, "finished", 1, 0, 0) in _audit(stack)


def test_ctrl_c_stops_a_replay_cleanly_and_the_same_command_goes_on(stack: Stack) -> None:
    bus = stack.bus()
    originals = [bus.publish_sync("user.birth_data.updated", {"n": n}) for n in range(6)]
    stack.start_router()
    stack.settle()
    before = stack.queue_length("alpha")
    command = [sys.executable, "-m", "project.cli", "replay", "--pattern", "user.#", "--handler",
               f"{APP}.on_birth_data", "--per-second", "2", "--actor", "ops"]  # fmt: skip
    env = {**os.environ, **stack.env}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "6 to go" in proc.stderr.readline()  # plain lines: the output is not a terminal
    wait_for(lambda: stack.queue_length("alpha") > before, what="the first copies sent")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; run the same command again" in err and "Traceback" not in err
    sent_first = stack.queue_length("alpha") - before
    assert 0 < sent_first < 6
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert stack.queue_length("alpha") - before == 6  # each original once, over both runs
    assert [a[3] for a in _audit(stack)] == ["interrupted", "finished"]
    assert len(originals) == 6
