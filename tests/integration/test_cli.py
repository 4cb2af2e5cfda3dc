"""The eventbus console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack


def _eventbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "project.cli", *args],
        cwd=ROOT,
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_routes_lists_every_subscription(stack: Stack) -> None:
    out = _eventbus(stack, "routes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["PATTERN", "HANDLER", "QUEUE"]
    assert "cosmic.solar_storm.detected  tests.integration.app.StormWatchModule.on_storm" in out.stdout
    assert any(
        line.split() == ["bulk.*.made,", "bulk.#", "tests.integration.app.StormWatchModule.on_bulk", "beta"]
        for line in lines
    )
    assert len(lines) == 1 + 17  # the header, then one line per subscription of tests/integration/app.py


def test_publish_is_seen_by_tail_and_dispatched(stack: Stack) -> None:
    tail = stack.start(
        "tail", sys.executable, "-m", "project.cli", "tail", "user.#", "--count", "1", ready="listening for"
    )
    out = _eventbus(stack, "publish", "cosmic.full_moon")  # does not match the tail's pattern
    assert out.returncode == 0, out.stderr
    out = _eventbus(stack, "publish", "user.birth_data.updated", "--data", '{"source": "cli"}', "--user", "u9")
    assert out.returncode == 0, out.stderr
    event_id = out.stdout.strip()
    assert tail.wait(timeout=30) == 0
    printed = [line for line in stack.log("tail").splitlines() if line.startswith("{")]
    assert len(printed) == 1
    event = json.loads(printed[0])
    assert (event["event_id"], event["user_id"], event["data"], event["module"]) == (
        event_id,
        "u9",
        {"source": "cli"},
        "cli",
    )

    stack.start_worker(queues="alpha")
    stack.start_router()
    wait_for(lambda: stack.runs().get(f"{event_id}:on_birth_data") == 1, what="the handler")


def test_publish_with_a_bad_name_fails_clearly(stack: Stack) -> None:
    out = _eventbus(stack, "publish", "Not A Name")
    assert out.returncode == 2
    assert "invalid event name" in out.stderr and "Traceback" not in out.stderr
