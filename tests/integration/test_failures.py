"""Failing handlers, an unreachable log database, and event loops."""

from __future__ import annotations

import json
import uuid

import psycopg2
import pytest

from project.records import event_record
from tests.conftest import wait_for
from tests.integration.conftest import PG_DSN, Stack, _pg_admin
from tests.rabbitmq import WITH_CLUSTER

DELIVERIES = "SELECT handler, status, attempts, error FROM event_deliveries WHERE event_id = :e"


@pytest.mark.brokers(*WITH_CLUSTER)
def test_handler_failing_until_it_succeeds_is_retried(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("flaky.job.requested", {"job": 1})
    rows = stack.wait_query(DELIVERIES, until=lambda r: r and r[0].status == "succeeded", e=event_id)
    assert rows[0].attempts == 3
    assert stack.runs() == {f"{event_id}:flaky": 3}


@pytest.mark.brokers(*WITH_CLUSTER)
def test_handler_that_always_fails_is_dead_and_module_error_is_published(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("doomed.job.requested", {"job": 2}, user_id="u7")
    rows = stack.wait_query(DELIVERIES, until=lambda r: r and r[0].status == "dead", e=event_id)
    assert rows[0].attempts == 3  # max_retries=2
    assert "always fails" in rows[0].error
    assert stack.runs() == {f"{event_id}:doomed": 3}

    seen = wait_for(lambda: stack.redis.lrange(f"{stack.prefix}:test:seen:on_module_error", 0, -1))
    report = json.loads(seen[0])
    assert report["event_type"] == "module.error"
    assert report["causation_id"] == event_id
    assert report["user_id"] == "u7"
    assert report["data"]["handler"] == "tests.integration.app.doomed"
    assert report["data"]["event_id"] == event_id
    assert report["data"]["attempts"] == 3


@pytest.mark.brokers(*WITH_CLUSTER)
def test_failing_module_error_handler_never_publishes_another(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    report = {"handler": "some.handler", "queue": "q", "event_id": None, "event_type": "some.other.thing",
              "attempts": 1, "error": "RuntimeError()"}  # fmt: skip  # module.error's contract needs each
    event_id = stack.bus().publish_sync("module.error", report)
    stack.wait_query(DELIVERIES, until=lambda r: r and r[0].status == "dead", e=event_id)
    stack.settle()
    rows = stack.query("SELECT event_type, causation_id::text FROM events_log")
    assert [tuple(r) for r in rows] == [("module.error", None)]


@pytest.mark.brokers(*WITH_CLUSTER)
def test_loop_guard_stops_a_handler_republishing_its_own_event(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    root = stack.bus().publish_sync("loop.ping.sent", {"n": 0})
    # EVENTS_MAX_HOPS=3 in the test stack: hops 0..3 are published, hop 4 is refused.
    report = stack.wait_query(
        "SELECT data FROM events_log WHERE event_type = 'module.error'", until=lambda r: len(r) == 1
    )[0].data
    assert "HopLimitExceeded" in report["error"]
    stack.settle()
    chain = stack.query(
        "SELECT event_id::text, causation_id::text, correlation_id::text, hops, data "
        "FROM events_log WHERE event_type = 'loop.ping.sent' ORDER BY hops"
    )
    assert [r.hops for r in chain] == [0, 1, 2, 3]
    assert [r.data["n"] for r in chain] == [0, 1, 2, 3]
    assert all(r.correlation_id == root for r in chain)
    assert [r.causation_id for r in chain] == [None] + [r.event_id for r in chain[:-1]]
    assert report["event_id"] == chain[-1].event_id
    assert sum(stack.runs().values()) == 4


def test_log_database_unreachable_delays_rows_and_loses_none(stack: Stack) -> None:
    stack.start_worker(queues="alpha")
    stack.start_router()
    bus = stack.bus()
    first = bus.publish_sync("user.birth_data.updated", user_id="before")
    stack.wait_query("SELECT 1 FROM events_log", until=lambda r: len(r) == 1)

    _pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS false")
    _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{stack.database}'")
    try:
        ids = [bus.publish_sync("user.birth_data.updated", user_id=f"u{i}") for i in range(300)]
        runs = stack.wait_runs(301)  # dispatch goes on
        assert set(runs) == {f"{i}:on_birth_data" for i in [first, *ids]}
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(PG_DSN.rsplit("/", 1)[0] + f"/{stack.database}").close()
        wait_for(lambda: "log writer:" in stack.log("router"), what="the log writer to notice the outage")
    finally:
        _pg_admin(f"ALTER DATABASE {stack.database} WITH ALLOW_CONNECTIONS true")

    rows = stack.wait_query(
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events_log", until=lambda r: r[0].n >= 301
    )
    assert tuple(rows[0]) == (301, 301)
    stack.settle()
    assert stack.query("SELECT count(*) FROM events_log")[0][0] == 301
    statuses = stack.wait_query(
        "SELECT status, count(*) FROM event_deliveries GROUP BY status",
        until=lambda r: dict(r).get("succeeded") == 301,
    )
    assert dict(statuses) == {"succeeded": 301}


def test_record_postgresql_refuses_is_set_aside_and_the_rest_are_written(stack: Stack) -> None:
    stack.start_router()
    bus = stack.bus()
    before = [bus.publish_sync("user.birth_data.updated", user_id=f"u{i}") for i in range(5)]
    # publish and the router refuse a NUL now; a record that carries one anyway (an older
    # producer, a hand-made record) goes straight into the log buffer.
    poison = str(uuid.uuid4())
    envelope = {"event_id": poison, "event_type": "user.note.added", "user_id": None, "module": None,
                "data": {"text": "nul \u0000 inside"}, "timestamp": "2026-01-01T00:00:00+00:00",
                "causation_id": None, "correlation_id": None, "hops": 0}  # fmt: skip
    stack.redis.xadd(
        bus.keys.scoped("user.note.added").log_buffer, {"r": event_record(json.dumps(envelope), [])}
    )  # JSONB refuses \u0000
    after = bus.publish_sync("user.birth_data.updated", user_id="later")
    rows = stack.wait_query("SELECT event_id::text FROM events_log", until=lambda r: len(r) == 6)
    assert {r.event_id for r in rows} == {*before, after}
    rejected = wait_for(lambda: stack.redis.xrange(stack.bus().keys.log_rejected))
    assert len(rejected) == 1
    assert poison.encode() in rejected[0][1][b"r"]
    assert stack.procs["router"].poll() is None
