"""One trace from a span around publish, through the router and the workers, along the demo's chain."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack

MODULES = "tests.integration.chain_app,tests.integration.span_capture"
H = "tests.integration.chain_app."

# Runs in its own process, so the SDK provider it installs stays out of the test process.
PUBLISHER = """
import json, sys
from opentelemetry import trace
from tests.integration import span_capture
from project.events import event_bus

with trace.get_tracer("checkout").start_as_current_span("POST /birth-data") as root:
    event_id = event_bus.publish_sync(sys.argv[1], json.loads(sys.argv[2]))
print(json.dumps({"event_id": event_id, "in_memory": [s.name for s in span_capture.exporter.get_finished_spans()]}))
"""


def _spans(stack: Stack, count: int) -> list[dict[str, Any]]:
    key = f"{stack.prefix}:test:spans"
    wait_for(lambda: stack.redis.llen(key) >= count, timeout_s=60, what=f"{count} spans")
    return [json.loads(raw) for raw in stack.redis.lrange(key, 0, -1)]


def _publish(stack: Stack, event_type: str = "user.birth_data.updated", data: str = '{"user_id": 7}') -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", PUBLISHER, event_type, data],
        cwd=ROOT,
        env={**stack.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _start(stack: Stack, **extra_env: str) -> None:
    stack.env["EVENT_HANDLER_MODULES"] = MODULES
    stack.start_worker(queues="chain", concurrency=2, **extra_env)
    stack.start_router()


def test_the_demo_chain_forms_one_trace_from_the_publishing_span(stack: Stack) -> None:
    _start(stack)
    published = _publish(stack)
    assert published["in_memory"] == ["send user.birth_data.updated", "POST /birth-data"]

    # root, 3 sends, 3 handler runs
    spans = _spans(stack, 7)
    assert len({s["trace_id"] for s in spans}) == 1, spans
    by_name = {(s["name"], s["attributes"].get("messaging.destination.subscription.name")): s for s in spans}
    assert len(by_name) == 7, sorted(by_name)
    root = by_name[("POST /birth-data", None)]
    send_birth = by_name[("send user.birth_data.updated", None)]
    recalculate = by_name[("process user.birth_data.updated", H + "recalculate")]
    invalidate = by_name[("process user.birth_data.updated", H + "invalidate_user")]
    send_profile = by_name[("send module.profile.calculated", None)]
    on_profile = by_name[("process module.profile.calculated", H + "on_profile")]
    send_synthesis = by_name[("send synthesis.completed", None)]

    assert root["parent_id"] is None
    assert send_birth["parent_id"] == root["span_id"]
    assert recalculate["parent_id"] == send_birth["span_id"]
    assert invalidate["parent_id"] == send_birth["span_id"]
    assert send_profile["parent_id"] == recalculate["span_id"]
    assert on_profile["parent_id"] == send_profile["span_id"]
    assert send_synthesis["parent_id"] == on_profile["span_id"]

    assert send_birth["kind"] == "PRODUCER"
    assert send_birth["attributes"] == {
        "messaging.system": "eventbus",
        "messaging.destination.name": "user.birth_data.updated",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.message.id": published["event_id"],
    }
    assert recalculate["kind"] == "CONSUMER"
    assert recalculate["status"] == "UNSET"
    assert recalculate["attributes"] == {
        "messaging.system": "eventbus",
        "messaging.destination.name": "user.birth_data.updated",
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.message.id": published["event_id"],
        "messaging.destination.subscription.name": H + "recalculate",
        "messaging.consumer.group.name": "chain",
        "messaging.message.conversation_id": published["event_id"],
    }
    # The event the handler published is the message of the next hop, in the same conversation.
    assert on_profile["attributes"]["messaging.message.id"] == send_profile["attributes"]["messaging.message.id"]
    assert on_profile["attributes"]["messaging.message.conversation_id"] == published["event_id"]
    rows = stack.wait_query(
        "SELECT event_type FROM events_log ORDER BY hops", until=lambda rows: len(rows) == 3, timeout_s=30
    )
    assert [r.event_type for r in rows] == [
        "user.birth_data.updated",
        "module.profile.calculated",
        "synthesis.completed",
    ]


def test_the_report_of_a_dead_delivery_continues_the_trace_under_the_run_that_failed(stack: Stack) -> None:
    _start(stack)
    event_id = _publish(stack, "report.render.requested", "{}")["event_id"]
    # root, its send, two failed runs, the module.error's send
    spans = _spans(stack, 5)
    assert len({s["trace_id"] for s in spans}) == 1, spans
    send = next(s for s in spans if s["name"] == "send report.render.requested")
    runs = [s for s in spans if s["name"] == "process report.render.requested"]
    (report,) = [s for s in spans if s["name"] == "send module.error"]
    assert len(runs) == 2 and all(r["status"] == "ERROR" and r["parent_id"] == send["span_id"] for r in runs)
    assert report["parent_id"] in {r["span_id"] for r in runs}  # the last run, in the process that ran it
    assert report["kind"] == "PRODUCER"
    (row,) = stack.wait_query(
        "SELECT data FROM events_log WHERE event_type = 'module.error'", until=lambda rows: len(rows) == 1
    )
    assert row.data["event_id"] == event_id and row.data["handler"] == H + "render"


# Where `opentelemetry-instrument` puts its sitecustomize: first on PYTHONPATH, so Celery is
# instrumented when the interpreter starts, before the application is imported.
_AUTO_INSTRUMENTATION = importlib.util.find_spec("opentelemetry.instrumentation.auto_instrumentation.sitecustomize")


@pytest.mark.parametrize("instrumented", ["worker_process_init", "opentelemetry-instrument"])
def test_celerys_own_instrumentation_joins_the_same_trace(stack: Stack, instrumented: str) -> None:
    if instrumented == "worker_process_init":  # in each pool child, as the instrumentation's docs show
        _start(stack, TEST_CELERY_INSTRUMENTATION="worker_process_init")
    else:  # at interpreter start, before the app connects a receiver of its own
        assert _AUTO_INSTRUMENTATION is not None and _AUTO_INSTRUMENTATION.origin is not None
        _start(stack, PYTHONPATH=os.pathsep.join([os.path.dirname(_AUTO_INSTRUMENTATION.origin), str(ROOT)]))
    published = _publish(stack)
    # root, 3 sends, Celery's 3 run/<task> spans and the 3 handler runs in them
    spans = _spans(stack, 10)
    stack.settle()
    spans = _spans(stack, 10)
    assert len(spans) == 10, [s["name"] for s in spans]
    assert {s["trace_id"] for s in spans} == {spans[0]["trace_id"]}, spans
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_id"] is None]
    assert [s["name"] for s in roots] == ["POST /birth-data"]
    assert all(s["parent_id"] in by_id for s in spans if s is not roots[0]), "a parent outside the trace"
    assert Counter(s["name"].split(" ")[0].split("/")[0] for s in spans) == {
        "POST": 1,
        "send": 3,
        "run": 3,
        "process": 3,
    }

    # the publisher's send span → Celery's run/<task> span → the handler's span, for each delivery
    sends = {s["attributes"]["messaging.destination.name"]: s for s in spans if s["name"].startswith("send ")}
    handled = {
        s["attributes"]["messaging.destination.subscription.name"]: s for s in spans if s["name"].startswith("process ")
    }
    assert sorted(handled) == [H + "invalidate_user", H + "on_profile", H + "recalculate"]
    for name, span in handled.items():
        celery_run = by_id[span["parent_id"]]
        assert celery_run["name"] == f"run/{name}"
        assert celery_run["kind"] == "CONSUMER"
        assert celery_run["attributes"]["celery.action"] == "run"
        assert celery_run["attributes"]["celery.task_name"] == name
        assert celery_run["pid"] == span["pid"]
        assert celery_run["parent_id"] == sends[span["attributes"]["messaging.destination.name"]]["span_id"]
        assert span["links"] == []  # its publisher is an ancestor: nothing to link
    # and what a handler publishes continues from inside the handler's span
    assert sends["user.birth_data.updated"]["parent_id"] == roots[0]["span_id"]
    assert sends["user.birth_data.updated"]["attributes"]["messaging.message.id"] == published["event_id"]
    assert sends["module.profile.calculated"]["parent_id"] == handled[H + "recalculate"]["span_id"]
    assert sends["synthesis.completed"]["parent_id"] == handled[H + "on_profile"]["span_id"]


# A process of its own with an SDK provider (ALWAYS_ON, or what OTEL_TRACES_SAMPLER says) whose
# spans stay in memory: what publish, sync and async, makes of them, failures included.
_PUBLISH_OUTCOMES = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from project.bus import EventBus
from project.errors import EventBusError
from project.events import event_bus
from project.settings import get_settings

out = {}
def attempt(name, call):
    try:
        out[name] = call()
    except EventBusError as exc:
        out[name] = type(exc).__name__
attempt("sync", lambda: event_bus.publish_sync("user.created", {"a": 1}))
attempt("async", lambda: asyncio.run(event_bus.publish("user.created", {"a": 2})))
attempt("bad", lambda: event_bus.publish_sync("user.created", {"a": float("nan")}))
gone = EventBus(get_settings().model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "redis_cluster": False}))
attempt("gone", lambda: gone.publish_sync("user.created", {"a": 3}))
provider.force_flush()
out["spans"] = [
    {"name": s.name, "status": s.status.status_code.name, "events": [e.name for e in s.events],
     "id": (s.attributes or {}).get("messaging.message.id"), "span_id": f"{s.context.span_id:016x}"}
    for s in exporter.get_finished_spans()
]
out["entries"] = [json.loads(f[b"e"]) for _, f in event_bus.sync_client().xrange(event_bus.keys.stream)]
print(json.dumps(out))
"""


def _outcomes(stack: Stack, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PUBLISH_OUTCOMES], cwd=ROOT, env={**stack.env, "PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_every_publish_ends_its_span_once_and_a_failed_one_records_why(stack: Stack) -> None:
    out = _outcomes(stack)
    assert out["bad"] == "PayloadNotSerializable" and out["gone"] == "PublishOutcomeUnknown"
    by_id = {s["id"]: s for s in out["spans"]}
    assert [s["name"] for s in out["spans"]] == ["send user.created"] * 4
    for key in ("sync", "async"):
        assert by_id[out[key]]["status"] == "UNSET" and by_id[out[key]]["events"] == []
    failed = [s for s in out["spans"] if s["status"] == "ERROR"]
    assert len(failed) == 2 and all(s["events"] == ["exception"] for s in failed)
    # Each stored envelope carries its own span's context, sampled.
    for entry in out["entries"]:
        assert entry["traceparent"].split("-")[2] == by_id[entry["event_id"]]["span_id"]
        assert int(entry["traceparent"].rsplit("-", 1)[1], 16) & 1  # sampled
    assert {e["event_id"] for e in out["entries"]} == {out["sync"], out["async"]}


def test_a_publish_whose_span_records_nothing_still_carries_its_context(stack: Stack) -> None:
    out = _outcomes(stack, OTEL_TRACES_SAMPLER="always_off")
    assert out["spans"] == []
    assert out["bad"] == "PayloadNotSerializable" and out["gone"] == "PublishOutcomeUnknown"
    assert {e["event_id"] for e in out["entries"]} == {out["sync"], out["async"]}
    for entry in out["entries"]:
        version, trace_id, span_id, flags = entry["traceparent"].split("-")
        assert version == "00" and not int(flags, 16) & 1 and int(trace_id, 16) and int(span_id, 16)
