"""The log writer: compact records into PostgreSQL, refused records set aside, outages waited out."""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from project.consumer import ensure_group
from project.eventlog import LogWriter
from project.keys import LOG_GROUP
from project.messages import delivery_task_id
from project.records import delivery_record, event_record
from tests.conftest import wait_for
from tests.integration.conftest import Stack, _db_url, _pg_admin

HANDLER = "tests.handler.one"
DELIVERIES = "SELECT status, attempts, error, queue, task_id::text FROM event_deliveries WHERE event_id = :e"


def _envelope(**overrides: object) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "user.birth_data.updated",
        "user_id": 42,
        "data": {"n": 1},
        "timestamp": "2026-01-01T00:00:00+00:00",
        "module": "m",
        "causation_id": None,
        "correlation_id": None,
        "hops": 0,
    }
    envelope.update(overrides)
    return envelope


def _event(envelope: dict[str, Any], *handlers: str) -> str:
    return event_record(json.dumps(envelope), [(h, "alpha") for h in handlers])


def _writer(stack: Stack) -> tuple[LogWriter, sa.Engine]:
    engine = stack.engine()
    writer = LogWriter(stack.settings, engine=engine, client=stack.redis, consumer="test")
    ensure_group(stack.redis, writer.keys.log_buffer, LOG_GROUP)
    return writer, engine


def _write(writer: LogWriter, *records: str) -> None:
    """Buffer ``records`` and have ``writer`` write them as one batch."""
    client, stream = writer.client, writer.keys.log_buffer
    for rec in records:
        client.xadd(stream, {"r": rec})
    reply: Any = client.xreadgroup(LOG_GROUP, writer.consumer, {stream: ">"}, count=10_000)
    writer.write(reply[0][1])


def test_records_postgresql_or_the_driver_refuse_are_set_aside_and_the_rest_are_written(stack: Stack) -> None:
    # A NUL in a text column is refused by psycopg2 itself (ValueError), in JSONB by
    # PostgreSQL (DataError), a malformed UUID too; each used to stall the writer on its batch.
    good_a, good_c = _envelope(), _envelope(user_id="u-c")
    poison = {
        "nul in user_id": _event(_envelope(user_id="a\u0000b"), HANDLER),
        "nul in module": _event(_envelope(module="m\u0000"), HANDLER),
        "nul in an error": delivery_record(good_a["event_id"], "other.handler", "failed", 1, "boom \u0000"),
        "not a uuid": delivery_record("not-a-uuid", HANDLER, "started", 1),
        "unreadable": '["d", "soon"]',
    }
    records = [
        _event(good_a, HANDLER),
        poison["nul in user_id"],
        delivery_record(good_a["event_id"], HANDLER, "started", 1),
        poison["nul in module"],
        poison["nul in an error"],
        _event(good_c),
        poison["not a uuid"],
        delivery_record(good_a["event_id"], HANDLER, "succeeded", 1),
        poison["unreadable"],
    ]
    keys = stack.bus().keys
    for rec in records:  # buffered before the writer starts: one batch holds them all
        stack.redis.xadd(keys.log_buffer, {"r": rec})
    writer = stack.start(
        "log-writer", sys.executable, "-m", "project.cli", "log-writer", LOG_LINGER_MS="0", LOG_BATCH_SIZE="100"
    )

    rows = stack.wait_query(
        "SELECT event_id::text, user_id, user_id_json FROM events_log ORDER BY user_id", until=lambda r: len(r) == 2
    )
    assert [tuple(r) for r in rows] == [(good_a["event_id"], "42", 42), (good_c["event_id"], "u-c", "u-c")]
    stack.wait_query(DELIVERIES, until=lambda r: r and r[0].status == "succeeded", e=good_a["event_id"])
    wait_for(lambda: stack.redis.xlen(keys.log_rejected) == 5, what="five records set aside")
    rejected = stack.redis.xrange(keys.log_rejected)
    by_record = {fields[b"r"].decode(): fields[b"reason"].decode() for _, fields in rejected}
    assert set(by_record) == set(poison.values())
    assert "NUL" in by_record[poison["nul in user_id"]]
    assert "NUL" in by_record[poison["nul in an error"]]
    assert "uuid" in by_record[poison["not a uuid"]].lower()
    assert by_record[poison["unreadable"]].startswith("unreadable record")
    wait_for(lambda: stack.redis.xlen(keys.log_buffer) == 0, what="every record to leave the buffer")
    assert "set aside" in stack.log("log-writer")

    later = _envelope()  # and it keeps going
    stack.redis.xadd(keys.log_buffer, {"r": _event(later)})
    stack.wait_query("SELECT 1 FROM events_log WHERE event_id = :e", until=bool, e=later["event_id"])
    assert writer.poll() is None


def test_a_delivery_record_without_attempts_keeps_the_rows_attempts(stack: Stack) -> None:
    writer, engine = _writer(stack)
    try:
        env = _envelope()
        eid = env["event_id"]
        _write(writer, _event(env, "h.one", "h.two", "h.three"))
        # Rows made by the event record: dispatched, attempt 0, task id derived.
        rows = stack.query(DELIVERIES + " ORDER BY handler", e=eid)
        assert [(r.status, r.attempts, r.queue, r.task_id) for r in rows] == [
            ("dispatched", 0, "alpha", delivery_task_id(eid, h)) for h in ("h.one", "h.three", "h.two")
        ]

        # In one batch: attempt 2 started, then a record that does not know the attempt.
        _write(
            writer,
            delivery_record(eid, "h.one", "started", 2, at=1.0),
            delivery_record(eid, "h.one", "rejected", None, "unknown task", at=2.0),
        )
        # Across batches: the row knows attempt 3; the record without attempts keeps it.
        _write(writer, delivery_record(eid, "h.two", "started", 3))
        _write(writer, delivery_record(eid, "h.two", "rejected", None, "unknown task"))
        # An earlier phase without attempts never overwrites a later one.
        _write(writer, delivery_record(eid, "h.three", "succeeded", 1))
        _write(writer, delivery_record(eid, "h.three", "started", None))
        # A record without attempts for a delivery with no row yet: attempts 0.
        _write(writer, delivery_record(eid, "h.four", "rejected", None, "unknown task"))

        rows = stack.query("SELECT handler, status, attempts, error FROM event_deliveries WHERE event_id = :e", e=eid)
        assert {r.handler: (r.status, r.attempts, r.error) for r in rows} == {
            "h.one": ("rejected", 2, "unknown task"),
            "h.two": ("rejected", 3, "unknown task"),
            "h.three": ("succeeded", 1, None),
            "h.four": ("rejected", 0, "unknown task"),
        }
        assert writer.rejected == 0
    finally:
        engine.dispose()


def test_records_of_the_previous_format_are_still_written(stack: Stack) -> None:
    writer, engine = _writer(stack)
    try:
        env = _envelope()
        eid = env["event_id"]
        old_event = json.dumps({"k": "e", "at": 1.5, "d": [["h.one", "alpha", delivery_task_id(eid, "h.one")]],
                                "event": env})  # fmt: skip
        old_delivery = json.dumps({"k": "d", "at": 2.5, "event_id": eid, "handler": "h.one", "queue": "alpha",
                                   "task_id": delivery_task_id(eid, "h.one"), "status": "succeeded", "attempt": 1,
                                   "error": None})  # fmt: skip
        _write(writer, old_event, old_delivery)
        assert stack.query("SELECT count(*) FROM events_log WHERE event_id = :e", e=eid)[0][0] == 1
        assert [tuple(r)[:2] for r in stack.query(DELIVERIES, e=eid)] == [("succeeded", 1)]
    finally:
        engine.dispose()


def test_a_database_not_migrated_yet_is_an_outage_not_a_bad_record(stack: Stack) -> None:
    name = f"eb_{stack.prefix}_empty"
    _pg_admin(f"CREATE DATABASE {name}")
    engine = sa.create_engine(_db_url(name), poolclass=sa.pool.NullPool)
    try:
        writer = LogWriter(stack.settings, engine=engine, client=stack.redis, consumer="test")
        ensure_group(stack.redis, writer.keys.log_buffer, LOG_GROUP)
        with pytest.raises(Exception, match="does not exist"):
            _write(writer, _event(_envelope(), HANDLER))
        assert stack.redis.xlen(writer.keys.log_rejected) == 0
        assert stack.redis.xlen(writer.keys.log_buffer) == 1  # pending, to be written later
    finally:
        engine.dispose()
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_shed_records_are_reported_once_per_interval_and_kept(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    writer, engine = _writer(stack)
    writer.shed_report_interval_s = 0.3
    stop = threading.Event()
    thread = threading.Thread(target=writer.run, args=(stop,))
    caplog.set_level(logging.ERROR, logger="eventbus.log_writer")

    def reports() -> list[str]:
        return [r.getMessage() for r in caplog.records if "records were shed" in r.getMessage()]

    thread.start()
    try:
        # The loop made its consumer group just before its first chores (the shed check among them).
        wait_for(lambda: stack.redis.exists(writer.keys.log_buffer), what="the writer's loop to start")
        assert reports() == []  # nothing shed, nothing said
        stack.redis.hincrby(writer.keys.log_shed, "e", 7)
        stack.redis.hincrby(writer.keys.log_shed, "d", 3)
        wait_for(lambda: len(reports()) >= 3, what="three reports")
    finally:
        stop.set()
        thread.join(timeout=10)
        engine.dispose()
    assert "7 event records and 3 delivery records" in reports()[0]
    assert len(reports()) <= 5  # once per interval, not once per loop
    assert stack.redis.hgetall(writer.keys.log_shed) == {b"e": b"7", b"d": b"3"}
