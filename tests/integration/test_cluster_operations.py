"""The operator's tools with the events on a private 3-master Redis Cluster, Celery's queues on RabbitMQ.

``tail`` and ``routes``, the Prometheus gauges, the explorer's dead letters, the reconciler and a
router or log writer started before Redis: each with real router, worker and log writer
processes. Redrive, replay and backfill run on the cluster in ``test_redrive_replay.py``.
Scopes are picked so that their slots are on different masters: what sums over the scopes
must reach every node.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from project.keys import Keys
from project.observability.gauges import LogBufferGauges, RouterGauges
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.redis_cluster import RedisCluster3

pytestmark = pytest.mark.brokers("cluster")

APP = "tests.integration.app"
DELIVERY = "SELECT status FROM event_deliveries WHERE event_id = :e AND handler = :h"


def _scopes_on_each_master(stack: Stack) -> list[str]:
    """One scope whose keys are on each master, in a fixed order."""
    keys, client = stack.bus().keys, stack.redis
    by_node: dict[str, str] = {}
    for i in range(1000):
        scope = f"scope{i}"
        by_node.setdefault(client.get_node_from_key(keys.of_scope(scope).stream).name, scope)  # type: ignore[attr-defined]
        if len(by_node) == 3:
            break
    assert len(by_node) == 3, by_node
    return [by_node[name] for name in sorted(by_node)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of a /metrics page, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def _collect(gauges: RouterGauges | LogBufferGauges) -> dict[str, float]:
    return {s.name: s.value for family in gauges.collect() for s in family.samples if not s.labels}


def _eventbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "project.cli", *args],
        cwd=ROOT, env={**stack.env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_tail_on_a_cluster_prints_the_events_of_every_scope_on_every_master(stack: Stack) -> None:
    scopes = _scopes_on_each_master(stack)
    stack.start("tail", sys.executable, "-m", "project.cli", "tail", ready="listening for")
    stack.start("tail-one", sys.executable, "-m", "project.cli", "tail", f"{scopes[1]}.#", ready="listening for")
    bus = stack.bus()
    sent: dict[str, str] = {}

    def printed(name: str) -> dict[str, str]:
        lines = [json.loads(line) for line in stack.log(name).splitlines() if line.startswith("{")]
        return {e["event_id"]: e["event_type"] for e in lines}

    def every_scope_seen() -> bool:
        # Pub/sub is at most once: publish until the tail, subscribed by now, printed one of each.
        for scope in scopes:
            sent[bus.publish_sync(f"{scope}.thing.happened", {"scope": scope})] = f"{scope}.thing.happened"
        seen = set(printed("tail").values())
        return seen == {f"{scope}.thing.happened" for scope in scopes}

    wait_for(every_scope_seen, timeout_s=30, interval_s=0.2, what="the tail to print an event of every scope")
    assert set(printed("tail")) <= set(sent)
    assert set(printed("tail-one").values()) == {f"{scopes[1]}.thing.happened"}
    # Every scope's stream has its events too: what tail printed was published, not only announced.
    for scope in scopes:
        assert stack.redis.xlen(stack.bus().keys.of_scope(scope).stream) >= 1


def test_routes_on_a_cluster_lists_every_subscription_without_reading_redis(stack: Stack) -> None:
    out = _eventbus(stack, "routes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["PATTERN", "HANDLER", "QUEUE"]
    assert "cosmic.solar_storm.detected  tests.integration.app.StormWatchModule.on_storm" in out.stdout
    assert len(lines) == 1 + 17


def test_gauges_on_a_cluster_add_up_every_scope(stack: Stack) -> None:
    scopes = _scopes_on_each_master(stack)
    bus = stack.bus()
    keys: Keys = bus.keys
    for n, scope in enumerate(scopes, start=1):
        for _ in range(n):
            bus.publish_sync(f"{scope}.thing.happened", {})
    # No router yet: every event waits, in three streams on three masters.
    router_gauges = RouterGauges(stack.redis, keys, refresh_s=0)
    waiting = _collect(router_gauges)
    assert waiting["eventbus_router_lag_entries"] == 1 + 2 + 3
    assert waiting["eventbus_router_pending_entries"] == 0
    assert waiting["eventbus_router_oldest_unacked_age_seconds"] > 0
    assert waiting["eventbus_dead_letter_entries"] == 0

    router_port, writer_port = _free_port(), _free_port()
    on = {"METRICS_ENABLED": "1"}
    stack.start_router("router", "--no-log-writer", METRICS_ROUTER_PORT=str(router_port), **on)
    for scope in scopes[:2]:  # malformed: set aside in each scope's own dead-letter stream
        stack.redis.xadd(keys.of_scope(scope).stream, {"e": b"not json"})
    wait_for(
        lambda: _scrape(router_port).get("eventbus_dead_letter_entries") == 2,
        what="both dead letters counted on the router's /metrics",
    )
    wait_for(
        lambda: (
            _collect(router_gauges)["eventbus_router_lag_entries"] == 0
            and _collect(router_gauges)["eventbus_router_pending_entries"] == 0
        ),
        what="the router to read every scope",
    )
    router = _scrape(router_port)
    assert router["eventbus_router_oldest_unacked_age_seconds"] == 0
    assert router["eventbus_dead_letter_entries"] == 2

    # The router recorded each event in its scope's log buffer; no log writer has read them.
    log_gauges = LogBufferGauges(stack.redis, keys, refresh_s=0)
    buffered = _collect(log_gauges)
    assert buffered["eventbus_log_buffer_records"] == 1 + 2 + 3
    assert buffered["eventbus_log_buffer_oldest_age_seconds"] > 0
    assert buffered["eventbus_log_rejected_entries"] == 0

    stack.start(
        "log-writer", sys.executable, "-m", "project.cli", "log-writer", ready="metrics on",
        METRICS_LOG_WRITER_PORT=str(writer_port), **on,
    )  # fmt: skip
    stack.wait_query("SELECT count(*) AS n FROM events_log", until=lambda rows: rows[0].n == 6)

    def drained() -> dict[str, float] | None:
        samples = _scrape(writer_port)
        return samples if samples.get("eventbus_log_buffer_records") == 0 else None

    writer = wait_for(drained, what="the log buffers of every scope to be empty on the log writer's /metrics")
    assert writer["eventbus_log_buffer_oldest_age_seconds"] == 0
    assert writer["eventbus_log_rejected_entries"] == 0


def _get(url: str, auth: tuple[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=20) as response:
        return int(response.status), response.read().decode()


def test_the_explorer_on_a_cluster_lists_the_dead_letters_of_every_scope(stack: Stack) -> None:
    scopes = _scopes_on_each_master(stack)
    keys = stack.bus().keys
    stack.start_router()
    for scope in scopes:
        stack.redis.xadd(keys.of_scope(scope).stream, {"e": f"not json in {scope}".encode()})
    letters = {
        scope: wait_for(lambda s=scope: stack.redis.xrange(keys.of_scope(s).dead_letter), what=f"{scope} dead-lettered")
        for scope in scopes
    }
    port, auth = _free_port(), ("ops", "s3cret-explorer")
    stack.env.update({"EXPLORER_PORT": str(port), "EXPLORER_USER": auth[0], "EXPLORER_PASSWORD": auth[1]})
    stack.start("explorer", sys.executable, "-m", "project.cli", "explorer", ready="explorer listening")
    status, html = _get(f"http://127.0.0.1:{port}/problems", auth)
    assert status == 200
    for scope, entries in letters.items():
        entry_id = entries[0][0].decode()
        assert f"{keys.of_scope(scope).dead_letter} {entry_id}" in html, scope
        assert f"not json in {scope}" in html
    assert "the dead-letter stream is empty" not in html


def test_the_reconciler_on_a_cluster_resends_lost_deliveries_of_several_scopes_in_one_pass(stack: Stack) -> None:
    stack.env.update({"RECONCILE_AFTER_S": "1", "RECONCILE_INTERVAL_S": "0.5"})
    stack.start_router()
    bus = stack.bus()
    birth = bus.publish_sync("user.birth_data.updated", user_id="u1")
    storm = bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
    expected = {
        (birth, f"{APP}.on_birth_data"), (storm, f"{APP}.StormWatchModule.on_storm"),
        (storm, f"{APP}.on_any_detection"), (storm, f"{APP}.on_anything_cosmic"),
    }  # fmt: skip
    stack.wait_query(
        "SELECT event_id::text AS e, handler FROM event_deliveries WHERE status = 'dispatched'",
        until=lambda rows: {(r.e, r.handler) for r in rows} == expected,
    )
    wait_for(lambda: stack.queue_length("alpha") == 3 and stack.queue_length("beta") == 1, what="the tasks queued")
    # Lost on their way, in two scopes (two slots): one pass sends them all again.
    stack.purge("alpha")
    stack.purge("beta")
    wait_for(
        lambda: stack.queue_length("alpha") == 3 and stack.queue_length("beta") == 1,
        timeout_s=30, what="the reconciler to send every lost delivery again",
    )  # fmt: skip
    wait_for(lambda: stack.log("router").count("dispatched and never started; sent again") >= 4, what="logged")
    assert "CROSSSLOT" not in stack.log("router") and "unexpected error" not in stack.log("router")
    stack.start_worker(queues="alpha,beta")
    for event_id, handler in expected:
        stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=handler)
    assert stack.runs() == {
        f"{birth}:on_birth_data": 1, f"{storm}:on_storm": 1, f"{storm}:on_any_detection": 1,
        f"{storm}:on_anything_cosmic": 1,
    }  # fmt: skip


def test_a_router_and_a_log_writer_started_before_the_cluster_wait_for_it(stack: Stack) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="eventbus-late-cluster-"))
    cluster = RedisCluster3(workdir)
    stack.env["REDIS_URL"] = cluster.url  # nothing answers there yet
    try:
        # Not ready: each waits for Redis.
        stack.start("router", sys.executable, "-m", "project.cli", "router", "--no-log-writer")
        stack.start("log-writer", sys.executable, "-m", "project.cli", "log-writer")
        for name, what in (("router", "router"), ("log-writer", "log writer")):
            wait_for(
                lambda n=name, w=what: f"{w}: Redis does not answer" in stack.log(n), what=f"{name} to wait for Redis"
            )
            assert stack.procs[name].poll() is None, stack.log(name)
        cluster.start()
        wait_for(lambda: "subscriptions, prefix" in stack.log("router"), timeout_s=60, what="the router to start")
        assert "Redis Cluster: a stream per scope" in stack.log("router")
        stack.start_worker(queues="alpha")
        event_id = stack.bus().publish_sync("user.birth_data.updated", user_id="u1")
        stack.wait_query(
            DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=f"{APP}.on_birth_data"
        )
        assert "Traceback" not in stack.log("router") + stack.log("log-writer")
    finally:
        for name in list(stack.procs):
            stack.stop(name)
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
