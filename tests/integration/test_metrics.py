"""/metrics of a router, a log writer and a prefork worker with two children, after real events."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from project.messages import TaskMessage, delivery_task_id, task_message
from tests.conftest import wait_for
from tests.integration.conftest import Stack

APP = "tests.integration.app"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _sum(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _wait_scrape(port: int, until: Callable[[Samples], bool], what: str) -> Samples:
    last: Samples = {}

    def check() -> bool:
        nonlocal last
        last = _scrape(port)
        return until(last)

    wait_for(check, timeout_s=30, what=f"{what} on :{port}")
    return last


@pytest.mark.brokers("redis", "cluster")
def test_metrics_of_router_log_writer_and_prefork_worker_match_the_events(stack: Stack, tmp_path: Path) -> None:
    router_port, writer_port, worker_port = _free_port(), _free_port(), _free_port()
    files = tmp_path / "prometheus"
    on = {"METRICS_ENABLED": "1", "PROMETHEUS_MULTIPROC_DIR": str(files)}
    # One directory for all three, as an environment set for every process would give it.
    worker_proc = stack.start_worker(concurrency=2, METRICS_WORKER_PORT=str(worker_port), **on)
    router_proc = stack.start_router("router", "--no-log-writer", METRICS_ROUTER_PORT=str(router_port), **on)
    writer_proc = stack.start(
        "log-writer",
        sys.executable,
        "-m",
        "project.cli",
        "log-writer",
        ready="metrics on",
        METRICS_LOG_WRITER_PORT=str(writer_port),
        **on,
    )
    bus = stack.bus()
    # Two handlers that sleep at once: the worker's two children both run something.
    for _ in range(2):
        bus.publish_sync("policy.long.requested", {"sleep_s": 1.0})
    births, storms = 12, 5
    for i in range(births):
        bus.publish_sync("user.birth_data.updated", {"user_id": i})
    for _ in range(storms):
        bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
    bus.publish_sync("flaky.job.requested", {})  # fails twice, then succeeds
    bus.publish_sync("doomed.job.requested", {})  # 3 attempts, dead, then a module.error
    # dead-lettered (on a cluster, in the user scope's stream)
    stack.redis.xadd(stack.bus().keys.scoped("user.birth_data.updated").stream, {"e": b"not json"})
    # a task message no worker can read (an id that is a list): kept in rejected-tasks
    bad = task_message(
        task_name=f"{APP}.on_birth_data", task_id=str(uuid.uuid4()), queue="alpha", envelope_json="{}",
        event_type="user.birth_data.updated", event_id=str(uuid.uuid4()),
    )  # fmt: skip
    stack.send_copy(TaskMessage("alpha", bad.task_id, bad.body, {**bad.headers, "id": ["a", "list"]}))

    events = 2 + births + storms + 2 + 1  # + the module.error a worker publishes
    deliveries = 2 + births + 3 * storms + 1 + 1 + 1
    stack.wait_query(
        "SELECT status FROM event_deliveries",
        until=lambda rows: len(rows) == deliveries and all(r.status in ("succeeded", "dead") for r in rows),
        timeout_s=60,
    )
    stack.settle()
    wait_for(lambda: stack.redis.xlen(stack.bus().keys.rejected_tasks) == 1, what="the malformed message kept")
    h = "tests.integration.app."

    router = _wait_scrape(
        router_port, lambda s: _sum(s, "eventbus_events_dispatched_total") == events, "every event dispatched"
    )
    assert _value(router, "eventbus_events_dispatched_total", event_type="user.birth_data.updated") == births
    assert _value(router, "eventbus_events_dispatched_total", event_type="cosmic.solar_storm.detected") == storms
    assert _value(router, "eventbus_events_dispatched_total", event_type="module.error") == 1
    assert _value(router, "eventbus_router_entries_total", outcome="dispatched") == events
    assert _value(router, "eventbus_router_entries_total", outcome="dead_lettered") == 1
    # Retries are sent by the worker, not the router: one task per (event, handler) here.
    assert _sum(router, "eventbus_tasks_sent_total") == deliveries
    assert _value(router, "eventbus_tasks_sent_total", queue="beta") == storms
    assert _value(router, "eventbus_router_lag_entries") == 0
    assert _value(router, "eventbus_router_pending_entries") == 0
    assert _value(router, "eventbus_router_oldest_unacked_age_seconds") == 0
    assert _value(router, "eventbus_dead_letter_entries") == 1
    assert _value(router, "eventbus_rejected_task_messages") == 1

    worker = _wait_scrape(
        worker_port,
        lambda s: (
            _sum(s, "eventbus_deliveries_total", outcome="dead") == 1
            and _sum(s, "eventbus_deliveries_total", outcome="succeeded") == deliveries - 1
        ),
        "every delivery settled",
    )
    succeeded = {
        "on_birth_data": births,
        "StormWatchModule.on_storm": storms,
        "on_any_detection": storms,
        "on_anything_cosmic": storms,
        "long_runner": 2,
        "flaky": 1,
        "on_module_error": 1,
    }
    for handler, count in succeeded.items():
        assert _value(worker, "eventbus_deliveries_total", handler=h + handler, outcome="succeeded") == count, handler
    assert _value(worker, "eventbus_deliveries_total", handler=h + "flaky", outcome="retried") == 2
    assert _value(worker, "eventbus_deliveries_total", handler=h + "doomed", outcome="retried") == 2
    assert _value(worker, "eventbus_deliveries_total", handler=h + "doomed", outcome="dead") == 1
    assert _value(worker, "eventbus_events_published_total", event_type="module.error") == 1
    runs = deliveries - 1 + 2 + 2 + 1  # every attempt ran its handler once
    assert _sum(worker, "eventbus_handler_duration_seconds_count") == runs
    assert _value(worker, "eventbus_handler_duration_seconds_count", handler=h + "long_runner") == 2
    assert _value(worker, "eventbus_handler_duration_seconds_sum", handler=h + "long_runner") >= 2.0
    assert _sum(worker, "eventbus_delivery_start_delay_seconds_count") == runs
    # Both children recorded (one file per process), and the listener summed them; the router
    # and the log writer, one process each, counted in memory, so the worker did not sum
    # their counts in with its own.
    pids = {int(p.stem.rsplit("_", 1)[-1]) for p in files.glob("*.db")}
    children = pids - {worker_proc.pid}
    assert len(children) >= 2, sorted(files.iterdir())
    assert not pids & {router_proc.pid, writer_proc.pid}, sorted(files.iterdir())
    assert _sum(worker, "eventbus_events_dispatched_total") == 0
    assert _sum(worker, "eventbus_log_writer_rows_written_total") == 0

    rows = stack.query("SELECT (SELECT count(*) FROM events_log), (SELECT count(*) FROM event_deliveries)")[0]
    assert rows == (events, deliveries)
    writer = _wait_scrape(
        writer_port,
        lambda s: _value(s, "eventbus_log_writer_rows_written_total", table="events_log") == events,
        "every event row written",
    )
    # Each delivery has its "dispatched" record and at least one from the worker.
    assert _value(writer, "eventbus_log_writer_rows_written_total", table="event_deliveries") >= 2 * deliveries
    assert _value(writer, "eventbus_log_writer_rows_set_aside_total") == 0
    assert _value(writer, "eventbus_log_buffer_records") == 0
    assert _value(writer, "eventbus_log_buffer_oldest_age_seconds") == 0
    assert _value(writer, "eventbus_log_rejected_entries") == 0
    assert _value(writer, "eventbus_log_shed_records", kind="event") == 0

    # A copy of a delivery that succeeded (a broker's late redelivery) is counted skipped, and
    # a well-formed message of a task no worker has rejected, by its task name.
    birth = stack.bus().keys.scoped("user.birth_data.updated").stream
    entry = next(f for _, f in stack.redis.xrange(birth) if b"birth_data" in f.get(b"e", b""))
    first_birth = json.loads(entry[b"e"])["event_id"]
    for name in ("on_birth_data", "no_such_handler"):
        stack.send_copy(task_message(
            task_name=h + name, task_id=delivery_task_id(first_birth, h + name), queue="alpha",
            envelope_json=entry[b"e"].decode(), event_type="user.birth_data.updated", event_id=first_birth,
        ))  # fmt: skip
    worker = _wait_scrape(
        worker_port,
        lambda s: (
            _sum(s, "eventbus_deliveries_total", outcome="skipped") == 1
            and _sum(s, "eventbus_deliveries_total", outcome="rejected") == 1
        ),
        "the late copy skipped, the unknown task's message rejected",
    )
    assert _value(worker, "eventbus_deliveries_total", handler=h + "on_birth_data", outcome="skipped") == 1
    assert _value(worker, "eventbus_deliveries_total", handler=h + "no_such_handler", outcome="rejected") == 1
    assert _sum(worker, "eventbus_deliveries_total", outcome="succeeded") == deliveries - 1  # no run again


def test_a_router_with_metrics_off_listens_on_no_port(stack: Stack) -> None:
    port = _free_port()
    stack.start_router(METRICS_ROUTER_PORT=str(port))
    assert "metrics on" not in stack.log("router")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_worker_whose_metrics_port_is_taken_says_so_runs_on_and_still_exports_its_spans(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack.start_worker(
            queues="alpha",
            METRICS_ENABLED="1",
            METRICS_WORKER_PORT=str(port),
            OTEL_TRACES_EXPORTER="console",  # spans as JSON on the worker's output (its log here)
            OTEL_SERVICE_NAME="worker-under-test",
        )
        stack.start_router()
        event_id = stack.bus().publish_sync("user.birth_data.updated", {"user_id": 1})
        stack.wait_query(
            "SELECT status FROM event_deliveries WHERE event_id = :e",
            until=lambda rows: [r.status for r in rows] == ["succeeded"],
            e=event_id,
        )
        stack.stop("worker")  # a warm shutdown: each pool process flushes its batched spans
    log = stack.log("worker")
    assert f"cannot listen on 127.0.0.1:{port}" in log and "serves no /metrics" in log
    assert '"name": "process user.birth_data.updated"' in log
    assert f'"messaging.message.id": "{event_id}"' in log
    assert '"service.name": "worker-under-test"' in log


# The README's recipe for an application's own process, in a process of its own (metrics,
# once on, stay on).
_APP_PROCESS = """
from prometheus_client import REGISTRY, generate_latest
from project.events import event_bus
from project.observability import metrics

metrics.enable(REGISTRY)
for _ in range(3):
    event_bus.publish_sync("user.birth_data.updated", {"user_id": 1})
print(generate_latest(REGISTRY).decode())
"""


def test_an_applications_process_counts_its_publishes_in_its_own_registry(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _APP_PROCESS], env={**os.environ, **stack.env}, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(done.stdout)
        for s in family.samples
    }
    assert samples[("eventbus_events_published_total", (("event_type", "user.birth_data.updated"),))] == 3
    assert stack.redis.xlen(stack.bus().keys.stream) == 3
