"""A Redis that requires a password works for every process: REDIS_URL=redis://:pw@host:port/0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.integration.redis_server import redis_server
from tests.integration.test_operations import _body, _free_port, _status

# Characters that must be quoted in a URL, so every client has to unquote it right.
PASSWORD = "s3cret/pw@with:specials%"


def _eventbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "project.cli", *args],
        cwd=ROOT, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_every_process_works_with_a_redis_that_requires_a_password(stack: Stack, tmp_path: Path) -> None:
    with redis_server(tmp_path, password=PASSWORD) as url:
        client = redis.Redis.from_url(url)
        with pytest.raises(redis.AuthenticationError):  # it does require the password
            redis.Redis.from_url(url.replace(url.split("//")[1].split("@")[0] + "@", "")).ping()
        port = _free_port()
        stack.env.update({
            "REDIS_URL": url, "FLOWER_PORT": str(port), "FLOWER_USER": "ops", "FLOWER_PASSWORD": "flower-pw",
            "STORM_CHECK_INTERVAL_S": "1", "FULL_MOON_CHECK_INTERVAL_S": "1", "BEAT_LOCK_TTL_S": "3",
            "NOAA_KP_URL": "http://127.0.0.1:9/nothing-listens-here",
            # The test handlers are not the cosmic application: ask for its beat checks by name.
            "APP_TASK_MODULES": "tasks.cosmic",
        })  # fmt: skip
        keys = stack.bus().keys
        stack.start_worker(queues="alpha,beta,gamma,cosmic")
        stack.start_router()

        # The CLI: routes, tail, publish.
        routes = _eventbus(stack, "routes")
        assert routes.returncode == 0 and "tests.integration.app.on_birth_data" in routes.stdout, routes.stderr
        tail = stack.start(
            "tail", sys.executable, "-m", "project.cli", "tail", "user.#", "--count", "1", ready="listening for"
        )
        out = _eventbus(stack, "publish", "user.birth_data.updated", "--data", '{"source": "cli"}', "--user", "u1")
        assert out.returncode == 0, out.stderr
        event_id = out.stdout.strip()
        assert tail.wait(timeout=30) == 0
        assert (
            json.loads(next(line for line in stack.log("tail").splitlines() if line.startswith("{")))["event_id"]
            == event_id
        )

        # Dispatched by the router, run by the worker, logged by the router's log writer.
        runs = f"{stack.prefix}:test:runs"
        wait_for(lambda: client.hget(runs, f"{event_id}:on_birth_data") == b"1", what="the handler to run")
        sql = "SELECT status FROM event_deliveries WHERE event_id = :e"
        stack.wait_query(sql, until=lambda r: [x.status for x in r] == ["succeeded"], e=event_id)

        # Beat: holds its leader lock in this Redis and its checks run on the worker.
        beat = [sys.executable, "-m", "celery", "-A", "project.celery_app", "beat", "--loglevel", "INFO"]
        stack.start("beat", *beat, ready="beat: Starting")
        wait_for(lambda: "now scheduling" in stack.log("beat"), what="beat to take the leader lock")
        assert client.exists(keys.beat_lock)
        wait_for(lambda: "solar storm check skipped" in stack.log("worker"), what="a storm check to run")
        stack.stop("beat")

        # Flower: basic auth in front, and it reads this Redis (its broker page lists the queues).
        stack.start("flower", sys.executable, "-m", "celery", "-A", "project.celery_app", "flower")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(base + "/") == 401, timeout_s=30, what="flower to answer 401")
        assert _status(base + "/", auth=("ops", "wrong")) == 401
        assert _status(base + "/", auth=("ops", "flower-pw")) == 200
        wait_for(
            lambda: "alpha" in _body(base + "/broker", ("ops", "flower-pw")), timeout_s=60, interval_s=1,
            what="flower's broker page to list the worker's queues",
        )  # fmt: skip
        assert "Unable to get queues" not in stack.log("flower")

        # The log writer alone, next to a router without one.
        stack.stop("router")
        stack.start_router("router-2", "--no-log-writer")
        stack.start("log-writer", sys.executable, "-m", "project.cli", "log-writer")
        second = stack.bus().publish_sync("cosmic.solar_storm.detected", {"kp_index": 7})
        stack.wait_query(
            "SELECT count(*) AS n FROM event_deliveries WHERE event_id = :e AND status = 'succeeded'",
            until=lambda r: r[0].n == 3, e=second,
        )  # fmt: skip
        assert stack.query("SELECT count(*) AS n FROM events_log WHERE event_id = :e", e=second)[0].n == 1
        for name in ("router", "router-2", "log-writer", "worker", "beat", "flower", "tail"):
            log = stack.log(name)
            assert "NOAUTH" not in log and "AuthenticationError" not in log and "WRONGPASS" not in log, name
        client.close()
