"""The application around the dispatcher, run by real routers, workers and beat processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from project.bus import EventBus
from project.errors import PublishRefused
from project.messages import delivery_task_id
from project.settings import Settings
from tasks.cosmic import (
    STORM_DETECTED,
    STORM_ENDED,
    FeedError,
    announce_full_moon,
    detect_solar_storm,
    fetch_kp_feed,
    full_moon_event_id,
    parse_kp_feed,
    storm_event_id,
)
from tasks.keys import AppKeys
from tasks.memory import ActiveMemory
from tasks.tables import birth_data, users
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.integration.redis_server import redis_server

DATA = Path(__file__).resolve().parents[1] / "data"
APP_QUEUES = "solar,memory,synthesis,cosmic"


@pytest.fixture
def app_stack(stack: Stack) -> Stack:
    stack.env["EVENT_HANDLER_MODULES"] = "handlers"
    stack.env["EVENT_CONTRACT_MODULES"] = "contracts"
    return stack


class Feed:
    """A local stand-in for the SWPC Kp feed: serves whatever the test sets."""

    def __init__(self) -> None:
        self.body = (DATA / "kp_quiet.json").read_bytes()
        self.status = 200
        self.delay_s = 0.0
        self.hits = 0
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                feed.hits += 1
                time.sleep(feed.delay_s)
                self.send_response(feed.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(feed.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/products/noaa-planetary-k-index.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, sample: str) -> None:
        self.body = (DATA / sample).read_bytes()


@pytest.fixture
def feed() -> Iterator[Feed]:
    f = Feed()
    yield f
    f.server.shutdown()
    f.server.server_close()


def _stream_events(stack: Stack, event_type: str) -> list[dict[str, object]]:
    entries = stack.redis.xrange(stack.bus().keys.stream)
    events = [json.loads(fields[b"e"]) for _, fields in entries]
    return [e for e in events if e["event_type"] == event_type]


def _add_users(stack: Stack, count: int, active: bool = True) -> list[int]:
    engine = stack.engine()
    with engine.begin() as conn:
        ids = [
            int(
                conn.execute(
                    sa.insert(users).values(name=f"user {i}", active=active).returning(users.c.id)
                ).scalar_one()
            )
            for i in range(count)
        ]
        for uid in ids:
            conn.execute(sa.insert(birth_data).values(user_id=uid, born_at=datetime(1985, 1, 1 + uid % 28, tzinfo=UTC)))
    engine.dispose()
    return ids


def test_demo_runs_the_chain_to_synthesis_and_every_delivery_succeeds(app_stack: Stack) -> None:
    app_stack.start_worker(queues=APP_QUEUES, concurrency=2)
    app_stack.start_router()
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "demo", "--wait-s", "60"],
        cwd=ROOT, env={**os.environ, **app_stack.env}, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the chain is complete" in out.stdout
    chain = app_stack.query("SELECT event_type, hops, correlation_id::text AS c FROM events_log ORDER BY hops")
    assert [(r.event_type, r.hops) for r in chain] == [
        ("user.birth_data.updated", 0), ("module.profile.calculated", 1), ("synthesis.completed", 2)
    ]  # fmt: skip
    assert len({r.c for r in chain}) == 1
    statuses = app_stack.query("SELECT handler, status FROM event_deliveries ORDER BY handler")
    assert [tuple(r) for r in statuses] == [
        ("handlers.memory.ActiveWorkingMemoryModule.invalidate_user", "succeeded"),
        ("handlers.solar.SolarModule.recalculate", "succeeded"),
        ("handlers.synthesis.SynthesisEngineModule.on_profile", "succeeded"),
    ]
    profile = app_stack.query("SELECT profile FROM module_profiles WHERE module = 'solar'")[0].profile
    assert profile["sun_sign"] == "cancer"
    synthesis = app_stack.query("SELECT synthesis FROM syntheses")[0].synthesis
    assert synthesis["modules"]["solar"] == profile
    assert synthesis["summary"].startswith("Sun in Cancer")


def test_a_solar_delivery_run_again_after_its_commit_writes_and_publishes_nothing_new(app_stack: Stack) -> None:
    [user] = _add_users(app_stack, 1)
    app_stack.start_worker(queues="solar", concurrency=1)
    app_stack.start_router()
    bus = app_stack.bus()
    event_id = bus.publish_sync("user.birth_data.updated", {"user_id": user})
    sql = "SELECT computed_at FROM module_profiles WHERE user_id = :u"
    [first] = app_stack.wait_query(sql, until=lambda r: len(r) == 1, u=user)
    wait_for(lambda: len(_stream_events(app_stack, "module.profile.calculated")) == 1, what="the announcement")
    handler = "handlers.solar.SolarModule.recalculate"
    app_stack.wait_query(
        "SELECT status FROM event_deliveries WHERE event_id = :e AND handler = :h",
        until=lambda r: r and r[0].status == "succeeded", e=event_id, h=handler,
    )  # fmt: skip

    # As when a worker dies between the handler's commit and the delivery's done mark: the
    # mark is gone and the same task comes again.
    task_id = delivery_task_id(event_id, handler)
    app_stack.redis.delete(bus.keys.delivery(task_id), bus.keys.lease(task_id))
    [envelope] = [e for e in _stream_events(app_stack, "user.birth_data.updated") if e["event_id"] == event_id]
    script = (
        "import json, sys; from project.celery_app import app; "
        "app.send_task(sys.argv[1], args=[json.loads(sys.argv[2])], task_id=sys.argv[3], queue='solar')"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, handler, json.dumps(envelope), task_id],
        cwd=ROOT, env={**os.environ, **app_stack.env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "succeeded in" in app_stack.log("worker") and ": 'duplicate'" in app_stack.log("worker"),
             what="the second copy to find its inbox row")  # fmt: skip
    assert [r.computed_at for r in app_stack.query(sql, u=user)] == [first.computed_at]
    assert len(_stream_events(app_stack, "module.profile.calculated")) == 1


def test_working_memory_is_invalidated_per_user_and_globally_in_one_step(app_stack: Stack) -> None:
    app_stack.start_worker(queues="memory")
    app_stack.start_router()
    bus = app_stack.bus()
    keys = AppKeys(bus.keys.prefix)
    memory = ActiveMemory(app_stack.redis, keys, ttl_s=600)
    memory.put("1", {"mood": "calm"})
    memory.put("2", {"mood": "curious"})
    assert app_stack.redis.ttl(keys.memory_user(0, "1")) > 0

    bus.publish_sync("user.birth_data.updated", {"user_id": 1})
    wait_for(lambda: memory.get("1") == {}, what="user 1's memory to be dropped")
    assert memory.get("2") == {"mood": "curious"}

    bus.publish_sync("cosmic.full_moon", {"at": "2026-11-24T15:00"})
    wait_for(lambda: memory.generation() == 1, what="the generation to move on")
    assert memory.get("2") == {}
    memory.put("2", {"mood": "new"})
    assert memory.get("2") == {"mood": "new"}


def test_global_cosmic_event_synthesizes_every_active_user_in_chunks(app_stack: Stack) -> None:
    app_stack.env["SYNTHESIS_CHUNK_SIZE"] = "10"
    active = _add_users(app_stack, 25)
    _add_users(app_stack, 2, active=False)
    app_stack.start_worker(queues="synthesis,memory", concurrency=2)
    app_stack.start_router()
    bus = app_stack.bus()
    storm = bus.publish_sync("cosmic.solar_storm.detected", {"kp_index": 8, "severity": "G4"})

    rows = app_stack.wait_query(
        "SELECT user_id, synthesis, trigger_event_id::text AS trig FROM syntheses", until=lambda r: len(r) >= 25
    )
    assert sorted(r.user_id for r in rows) == active
    assert all(r.trig == storm for r in rows)
    assert "geomagnetic storm G4" in rows[0].synthesis["summary"]
    assert app_stack.log("worker").count("Task tasks.synthesis.synthesize_chunk[") >= 3
    received = [line for line in app_stack.log("worker").splitlines()
                if "tasks.synthesis.synthesize_chunk[" in line and "received" in line]  # fmt: skip
    assert len(received) == 3  # 25 users in chunks of 10
    done = app_stack.wait_query(
        "SELECT user_id, causation_id::text AS c FROM events_log WHERE event_type = 'synthesis.completed'",
        until=lambda r: len(r) == 25,
    )
    assert {r.c for r in done} == {storm}


def test_solar_storm_is_published_once_per_storm_and_bad_feeds_publish_nothing(app_stack: Stack, feed: Feed) -> None:
    bus = app_stack.bus()

    def poll() -> str | None:
        return detect_solar_storm(bus, fetch_kp_feed(feed.url, timeout_s=2))

    assert poll() is None  # quiet
    feed.serve("kp_storm.json")
    first = poll()
    assert first == storm_event_id(STORM_DETECTED, "2024-05-10T12:00:00+00:00")  # from the storm's start
    assert poll() is None and poll() is None  # the same storm, polled again
    feed.serve("kp_storm_over.json")
    ended = poll()  # the first reading below Kp 5 ends it
    assert ended == storm_event_id(STORM_ENDED, "2024-05-10T12:00:00+00:00")
    assert poll() is None
    feed.serve("kp_storm_objects.json")
    second = poll()
    assert second is not None and second not in (first, ended)

    events = _stream_events(app_stack, STORM_DETECTED)
    assert [(e["event_id"], e["data"]["severity"], e["data"]["kp_index"]) for e in events] == [  # type: ignore[index]
        (first, "G4", 8.33), (second, "G5", 9.0)
    ]  # fmt: skip
    [end] = _stream_events(app_stack, STORM_ENDED)
    assert end["event_id"] == ended
    assert {k: v for k, v in end["data"].items() if k != "timestamp"} == {  # type: ignore[union-attr]
        "peak_severity": "G4", "peak_kp_index": 8.67,  # at 21:00, between two polls' latest readings
        "started_at": "2024-05-10T12:00:00+00:00", "ended_at": "2024-05-11T03:00:00+00:00", "duration_s": 15 * 3600,
    }  # fmt: skip

    feed.serve("kp_malformed.json")
    with pytest.raises(FeedError, match="not JSON"):
        poll()
    feed.status, feed.body = 503, b"<html>Service Unavailable</html>"
    with pytest.raises(FeedError):
        poll()
    feed.status, feed.delay_s = 200, 3.0
    feed.serve("kp_storm.json")
    with pytest.raises(FeedError, match="timed out"):
        fetch_kp_feed(feed.url, timeout_s=0.5)
    with pytest.raises(FeedError, match="cannot fetch"):
        fetch_kp_feed("http://127.0.0.1:9/nothing-listens-here", timeout_s=1)
    assert len(_stream_events(app_stack, STORM_DETECTED)) == 2


def test_a_cosmic_event_whose_publish_failed_is_published_by_the_next_check_once(tmp_path: Path) -> None:
    # A real refusal: a Redis ACL user that may do all but XADD, so publish fails before
    # storing anything (its script stops at XADD) while the checks' own keys still work.
    with redis_server(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        port = admin.connection_pool.connection_kwargs["port"]
        admin.acl_setuser("cosmic", enabled=True, passwords=["+pw"], keys=["~*"], channels=["*"],
                          commands=["+@all", "-xadd"])  # fmt: skip
        bus = EventBus(Settings(redis_url=f"redis://cosmic:pw@127.0.0.1:{port}/0", events_prefix="cosmic-test"))

        def allow_publish(allowed: bool) -> None:
            admin.acl_setuser("cosmic", commands=["+xadd" if allowed else "-xadd"])

        def events(event_type: str) -> list[str]:
            entries = admin.xrange(bus.keys.stream) if admin.exists(bus.keys.stream) else []
            found = [json.loads(fields[b"e"]) for _, fields in entries]
            return [e["event_id"] for e in found if e["event_type"] == event_type]

        storm = parse_kp_feed((DATA / "kp_storm.json").read_bytes())
        with pytest.raises(PublishRefused):
            detect_solar_storm(bus, storm)
        with pytest.raises(PublishRefused):
            detect_solar_storm(bus, storm)  # still refused: still owed
        allow_publish(True)
        detected = storm_event_id(STORM_DETECTED, "2024-05-10T12:00:00+00:00")
        assert detect_solar_storm(bus, storm) == detected
        assert detect_solar_storm(bus, storm) is None
        assert events(STORM_DETECTED) == [detected]

        # Its end, the same way.
        over = parse_kp_feed((DATA / "kp_storm_over.json").read_bytes())
        allow_publish(False)
        with pytest.raises(PublishRefused):
            detect_solar_storm(bus, over)
        allow_publish(True)
        ended = storm_event_id(STORM_ENDED, "2024-05-10T12:00:00+00:00")
        assert detect_solar_storm(bus, over) == ended
        assert detect_solar_storm(bus, over) is None
        assert events(STORM_ENDED) == [ended]

        # The full moon, the same way; and a check that died between its publish and its
        # guard publishes the same event_id again, which is stored once.
        after = datetime(2024, 1, 25, 20, 0, tzinfo=UTC)
        allow_publish(False)
        with pytest.raises(PublishRefused):
            announce_full_moon(bus, after)
        allow_publish(True)
        moon = announce_full_moon(bus, after)
        assert moon in {full_moon_event_id("2024-01-25T17:53+00:00"), full_moon_event_id("2024-01-25T17:54+00:00")}
        assert announce_full_moon(bus, after) is None
        for guard in admin.scan_iter(match=AppKeys(bus.keys.prefix).full_moon("*")):
            admin.delete(guard)
        assert announce_full_moon(bus, after) == moon
        assert events("cosmic.full_moon") == [moon]
        bus.close()
        admin.close()


def _cosmic_latest(stack: Stack) -> dict[str, dict[str, object]]:
    raw = stack.redis.hgetall(AppKeys(stack.prefix).cosmic_latest)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def test_a_storm_s_end_clears_it_from_the_conditions_and_later_syntheses(app_stack: Stack, feed: Feed) -> None:
    [user] = _add_users(app_stack, 1)
    app_stack.start_worker(queues="synthesis,memory", concurrency=2)
    app_stack.start_router()
    bus = app_stack.bus()

    def poll() -> str | None:
        return detect_solar_storm(bus, fetch_kp_feed(feed.url, timeout_s=2))

    def synthesis_after(event_id: str) -> dict[str, object]:
        sql = "SELECT synthesis, trigger_event_id::text AS trig FROM syntheses WHERE user_id = :u"
        rows = app_stack.wait_query(sql, until=lambda r: r and r[0].trig == event_id, u=user)
        return dict(rows[0].synthesis)

    feed.serve("kp_storm.json")
    detected = poll()
    assert detected is not None
    assert "geomagnetic storm G4 (Kp 8.33)" in str(synthesis_after(detected)["summary"])
    assert _cosmic_latest(app_stack)[STORM_DETECTED]["severity"] == "G4"

    feed.serve("kp_storm_over.json")
    ended = poll()
    assert ended is not None
    synthesis = synthesis_after(ended)
    assert "storm" not in str(synthesis["summary"])
    assert STORM_DETECTED not in synthesis["cosmic"]  # type: ignore[operator]
    latest = _cosmic_latest(app_stack)
    assert STORM_DETECTED not in latest
    assert latest[STORM_ENDED]["peak_severity"] == "G4"

    # A late copy of the storm's start (handlers run in parallel and retry) does not bring it back.
    [start] = [e for e in _stream_events(app_stack, STORM_DETECTED) if e["event_id"] == detected]
    late = bus.publish_sync(STORM_DETECTED, start["data"], module="cosmic")  # type: ignore[arg-type]
    app_stack.wait_query(
        "SELECT status FROM event_deliveries WHERE event_id = :e AND handler LIKE '%on_cosmic'",
        until=lambda r: r and r[0].status == "succeeded", e=late,
    )  # fmt: skip
    assert STORM_DETECTED not in _cosmic_latest(app_stack)
    assert "storm" not in str(synthesis_after(late)["summary"])


def test_a_fan_out_sent_twice_synthesizes_each_user_once(app_stack: Stack) -> None:
    app_stack.env["SYNTHESIS_CHUNK_SIZE"] = "10"
    active = _add_users(app_stack, 25)
    event_id = str(uuid.uuid4())
    cause = {"event_id": event_id, "event_type": "cosmic.full_moon", "user_id": None, "data": {"at": "2026-11-24"},
             "timestamp": datetime.now(UTC).isoformat(), "module": "cosmic", "causation_id": None,
             "correlation_id": event_id, "hops": 0}  # fmt: skip
    script = "import json, sys; from tasks.synthesis import fan_out; print(fan_out(json.loads(sys.argv[1])))"
    for _ in range(2):  # the handler that fans out, retried: both copies of every chunk are queued
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(cause)],
            cwd=ROOT, env={**os.environ, **app_stack.env}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0 and out.stdout.strip() == "3", out.stdout + out.stderr
    assert app_stack.queue_length("synthesis") == 6

    app_stack.start_worker(queues="synthesis", concurrency=2)

    def results() -> list[int]:
        lines = app_stack.log("worker").splitlines()
        return sorted(int(line.rsplit(":", 1)[1]) for line in lines
                      if "tasks.synthesis.synthesize_chunk[" in line and " succeeded in " in line)  # fmt: skip

    wait_for(lambda: len(results()) == 6, what="both copies of the 3 chunks")
    assert results() == [0, 0, 0, 5, 10, 10]  # each chunk ran once; its second copy was skipped
    completed = [e for e in _stream_events(app_stack, "synthesis.completed") if e["causation_id"] == event_id]
    assert sorted(int(e["user_id"]) for e in completed) == active  # type: ignore[call-overload]
    rows = app_stack.query("SELECT user_id FROM syntheses WHERE trigger_event_id = :e", e=event_id)
    assert sorted(r.user_id for r in rows) == active


def test_full_moon_is_announced_once(app_stack: Stack) -> None:
    bus = app_stack.bus()
    after = datetime(2024, 1, 25, 20, 0, tzinfo=UTC)  # full moon at 17:54 UTC
    first = announce_full_moon(bus, after)
    assert first is not None
    assert announce_full_moon(bus, after.replace(hour=23)) is None
    assert announce_full_moon(bus, datetime(2024, 2, 3, tzinfo=UTC)) is None  # a week later: not full
    events = _stream_events(app_stack, "cosmic.full_moon")
    assert [e["event_id"] for e in events] == [first]
    assert events[0]["data"]["at"] in ("2024-01-25T17:53+00:00", "2024-01-25T17:54+00:00")  # type: ignore[index]


def _sends(stack: Stack, name: str) -> int:
    return stack.log(name).count("Sending due task check-solar-storms")


def test_two_beats_fire_each_check_once_per_interval_and_the_standby_takes_over(app_stack: Stack, feed: Feed) -> None:
    feed.body = b"this is not json"  # a broken feed must not hurt beat or the worker
    env = {"NOAA_KP_URL": feed.url, "STORM_CHECK_INTERVAL_S": "1", "FULL_MOON_CHECK_INTERVAL_S": "1",
           "BEAT_LOCK_TTL_S": "3"}  # fmt: skip
    app_stack.env.update(env)
    app_stack.start_worker(queues="cosmic", concurrency=1)
    beat = [sys.executable, "-m", "celery", "-A", "project.celery_app", "beat", "--loglevel", "INFO"]
    app_stack.start("beat-1", *beat, ready="beat: Starting")
    app_stack.start("beat-2", *beat, ready="beat: Starting")
    wait_for(lambda: _sends(app_stack, "beat-1") + _sends(app_stack, "beat-2") >= 6, timeout_s=30, what="6 sends")
    counts = {name: _sends(app_stack, name) for name in ("beat-1", "beat-2")}
    leader = max(counts, key=lambda n: counts[n])
    standby = "beat-2" if leader == "beat-1" else "beat-1"
    assert counts[standby] == 0, counts
    assert "standing by" in app_stack.log(standby)

    feed.serve("kp_storm.json")
    wait_for(lambda: len(_stream_events(app_stack, STORM_DETECTED)) == 1, what="the storm event")
    assert "solar storm check skipped" in app_stack.log("worker")  # the garbage feed was logged

    app_stack.procs[leader].send_signal(signal.SIGKILL)
    app_stack.procs[leader].wait()
    wait_for(lambda: _sends(app_stack, standby) >= 3, timeout_s=30, what="the standby to take over")
    assert app_stack.procs["worker"].poll() is None
    hits_before = feed.hits
    wait_for(lambda: feed.hits >= hits_before + 2, what="polls to go on")
    assert len(_stream_events(app_stack, STORM_DETECTED)) == 1  # still one event for the storm
