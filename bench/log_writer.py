"""The log writer's batches into PostgreSQL against one INSERT and commit per event."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import sqlalchemy as sa

from bench.harness import Result, create_group, result, wipe
from project.eventlog import LogWriter
from project.events import event_bus
from project.keys import LOG_GROUP
from project.records import event_record
from project.settings import get_settings
from project.tables import events_log

__all__ = ["bench_log_writer"]


def _envelopes(count: int) -> list[str]:
    return [event_bus._encode("bench.item.made", {"i": i}, None, "bench")[1] for i in range(count)]


def bench_log_writer(n: int, baseline_n: int, rounds: int) -> list[Result]:
    """Rows a second: ``n`` event records through the log writer, ``baseline_n`` single-row inserts."""
    settings = get_settings()
    engine = sa.create_engine(settings.database_url)
    client = event_bus.sync_client()
    buffer = event_bus.keys.log_buffer

    def ours() -> float:
        wipe(client)
        pipe = client.pipeline(transaction=False)
        # The records the router writes, without deliveries: the same rows as the baseline.
        for envelope in _envelopes(n):
            pipe.xadd(buffer, {"r": event_record(envelope, [])})
        pipe.execute()
        writer = LogWriter(settings, engine=engine, client=client, consumer="bench")
        create_group(client, buffer, LOG_GROUP)
        start = time.perf_counter()
        while writer.written < n:
            reply: Any = client.xreadgroup(LOG_GROUP, "bench", {buffer: ">"}, count=settings.log_batch_size)
            writer.write(reply[0][1])
        return n / (time.perf_counter() - start)

    def baseline() -> float:
        rows = [json.loads(envelope) for envelope in _envelopes(baseline_n)]
        start = time.perf_counter()
        for ev in rows:
            with engine.begin() as conn:
                conn.execute(sa.insert(events_log).values(
                    event_id=ev["event_id"], event_type=ev["event_type"], user_id=None, module=ev["module"],
                    data=ev["data"], occurred_at=ev["timestamp"], causation_id=None,
                    correlation_id=ev["correlation_id"], hops=0))  # fmt: skip
        return baseline_n / (time.perf_counter() - start)

    try:
        pairs = [(ours(), baseline()) for _ in range(rounds)]
    finally:
        engine.dispose()
    return [result("log writer", statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                   10.0, "rows/s", note="baseline: one INSERT and commit per row through SQLAlchemy")]  # fmt: skip
