"""The events explorer against a real stack: the demo chain in a real headless Chromium, a dead
delivery redriven from the problems page, and the filters, pages and auth over plain HTTP.

The browser is Debian's ``chromium``, driven by Playwright's Python package (``executable_path``:
Playwright downloads no browser). Screenshots of each page land in ``tests/artifacts/``.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from project.tables import event_deliveries, events_log
from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack
from tests.integration.explorer_app import ERROR, fixed_key

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "tests" / "artifacts"
APP_QUEUES = "solar,memory,synthesis,cosmic,explorer"
AUTH = ("ops", "s3cret-explorer")
FLAKY = "tests.integration.explorer_app.flaky"
CHAIN = ("user.birth_data.updated", "module.profile.calculated", "synthesis.completed")
MEMORY = "handlers.memory.ActiveWorkingMemoryModule.invalidate_user"
SOLAR = "handlers.solar.SolarModule.recalculate"
SYNTHESIS = "handlers.synthesis.SynthesisEngineModule.on_profile"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_explorer(stack: Stack) -> str:
    """Run ``eventbus explorer`` for the stack; return its base URL."""
    port = _free_port()
    stack.env.update({"EXPLORER_PORT": str(port), "EXPLORER_USER": AUTH[0], "EXPLORER_PASSWORD": AUTH[1]})
    stack.start("explorer", sys.executable, "-m", "project.cli", "explorer", ready="explorer listening")
    return f"http://127.0.0.1:{port}"


def _get(url: str, auth: tuple[str, str] | None = AUTH) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read().decode(errors="replace")


def _listed(html: str) -> list[str]:
    """The event ids an events page lists, in its order."""
    return re.findall(r'data-event-id="([0-9a-f-]{36})"', html)


@pytest.fixture
def app_stack(stack: Stack) -> Stack:
    """The example application with the flaky handler beside it."""
    stack.env["EVENT_HANDLER_MODULES"] = "handlers,tests.integration.explorer_app"
    stack.env["EVENT_CONTRACT_MODULES"] = "contracts"
    return stack


@pytest.mark.timeout(300)
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_an_operator_follows_the_demo_chain_and_redrives_its_dead_step_in_a_browser(app_stack: Stack) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    app_stack.start_worker(queues=APP_QUEUES, concurrency=2)
    app_stack.start_router()
    base = _start_explorer(app_stack)
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "demo", "--wait-s", "0"],
        cwd=ROOT, env={**os.environ, **app_stack.env}, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    root = re.search(r"published user.birth_data.updated (\S+)", out.stdout).group(1)  # type: ignore[union-attr]
    user = re.search(r"created user (\d+)", out.stdout).group(1)  # type: ignore[union-attr]
    expected = {(MEMORY, "succeeded"), (SOLAR, "succeeded"), (SYNTHESIS, "succeeded"), (FLAKY, "dead")}
    app_stack.wait_query(
        "SELECT d.handler, d.status FROM event_deliveries d JOIN events_log e ON e.event_id = d.event_id"
        " WHERE e.correlation_id = :root",
        until=lambda rows: {(r.handler, r.status) for r in rows} >= expected, timeout_s=90, root=root,
    )  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        context = browser.new_context(
            http_credentials={"username": AUTH[0], "password": AUTH[1]}, viewport={"width": 1400, "height": 1000}
        )
        page = context.new_page()

        # The chain, from the root: every event and every handler, in causal order.
        page.goto(f"{base}/events/{root}")
        steps = page.locator(".tree .row").evaluate_all(
            "rows => rows.map(r => [r.dataset.eventType || r.dataset.handler, r.dataset.status || '',"
            " Number(r.style.getPropertyValue('--depth'))])"
        )
        by_name = {name: (status, depth) for name, status, depth in steps}
        for event_type, depth in zip(CHAIN, (0, 2, 4), strict=True):
            assert by_name[event_type] == ("", depth), steps
        assert by_name[MEMORY] == ("succeeded", 1) and by_name[SOLAR] == ("succeeded", 1), steps
        assert by_name[SYNTHESIS] == ("succeeded", 3) and by_name[FLAKY] == ("dead", 5), steps
        assert by_name["module.error"] == ("", 6), steps  # the dead delivery's report, under it
        names = [name for name, _, _ in steps]
        # What solar published hangs under solar's delivery, not under memory's.
        assert names.index(SOLAR) + 1 == names.index("module.profile.calculated"), steps
        # The failed step is the first thing on the page, linked to its line in the tree.
        summary = page.locator("#failed-steps")
        expect(summary).to_contain_text(FLAKY)
        expect(summary).to_contain_text(ERROR)
        summary.get_by_role("link", name=FLAKY).click()
        expect(page.locator(f'.row.delivery.failed[data-handler="{FLAKY}"]')).to_be_in_viewport()
        page.screenshot(path=str(ARTIFACTS / "explorer-event.png"), full_page=True)

        page.goto(f"{base}/events")
        expect(page.locator(f'#events tr[data-event-id="{root}"]')).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "explorer-events.png"), full_page=True)
        page.goto(f"{base}/users/{user}")
        expect(page.locator(f'details.chain.failed[data-root="{root}"]')).to_have_attribute("open", "")
        page.screenshot(path=str(ARTIFACTS / "explorer-user.png"), full_page=True)
        page.goto(f"{base}/?hours=1")
        expect(page.locator("figure.chart svg")).to_have_count(3)
        page.screenshot(path=str(ARTIFACTS / "explorer-overview.png"), full_page=True)

        # The dead delivery on the problems page; the handler is fixed, then it is redriven.
        page.goto(f"{base}/problems")
        group = page.locator(f'#problems tr[data-handler="{FLAKY}"][data-status="dead"]')
        expect(group).to_contain_text(ERROR)
        page.screenshot(path=str(ARTIFACTS / "explorer-problems.png"), full_page=True)
        app_stack.redis.set(fixed_key(app_stack.prefix), "1")
        group.get_by_role("button", name="Redrive…").click()
        expect(page.locator("#confirm")).to_have_text("Yes, redrive 1")
        page.screenshot(path=str(ARTIFACTS / "explorer-redrive-confirm.png"), full_page=True)
        page.locator("#confirm").click()
        expect(page.locator("#redrive-result")).to_contain_text("1 sent")
        page.screenshot(path=str(ARTIFACTS / "explorer-redrive-sent.png"), full_page=True)

        # It succeeds: on the event page, the delivery's status becomes succeeded.
        synthesis_event = app_stack.query(
            "SELECT event_id::text AS e FROM events_log WHERE correlation_id = :root AND event_type = :t",
            root=root, t="synthesis.completed",
        )[0].e  # fmt: skip
        row = page.locator(f'#deliveries tr[data-handler="{FLAKY}"]')

        def succeeded() -> bool:
            page.goto(f"{base}/events/{synthesis_event}")
            return row.get_attribute("data-status") == "succeeded"

        wait_for(succeeded, timeout_s=60, interval_s=0.5, what="the redriven delivery to succeed")
        expect(row).to_contain_text("redriven 1")
        expect(page.locator("#failed-steps")).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "explorer-redriven.png"), full_page=True)
        page.goto(f"{base}/problems")
        expect(page.locator(f'#problems tr[data-handler="{FLAKY}"]')).to_have_count(0)
        browser.close()
    assert app_stack.query(
        "SELECT actor, operation, sent FROM operations_audit WHERE operation = 'redrive' AND NOT dry_run"
    ) == [(f"explorer:{AUTH[0]}", "redrive", 1)]


# -- over plain HTTP, on a record written directly ---------------------------------------------


def _record(stack: Stack) -> dict[str, Any]:
    """A small record: a cosmic chain with a dead step, user events, a rejected delivery, 120 more."""
    now = datetime.now(UTC).replace(microsecond=0)
    ids = {name: str(uuid.uuid4()) for name in ("storm", "moon", "created", "birth", "old")}
    rows = [
        dict(event_id=ids["storm"], event_type="cosmic.solar_storm.detected", user_id="7", module="beat",
             occurred_at=now - timedelta(minutes=5)),
        dict(event_id=ids["moon"], event_type="cosmic.full_moon", user_id=None, module="beat",
             occurred_at=now - timedelta(minutes=4)),
        dict(event_id=ids["created"], event_type="user.created", user_id="7", module="web",
             occurred_at=now - timedelta(minutes=3)),
        dict(event_id=ids["birth"], event_type="user.birth_data.updated", user_id="8", module="web",
             occurred_at=now - timedelta(minutes=2)),
        dict(event_id=ids["old"], event_type="user.created", user_id="8", module="web",
             occurred_at=now - timedelta(days=3)),
    ]  # fmt: skip
    bulk = [
        dict(event_id=str(uuid.uuid4()), event_type="order.placed", user_id="9", module="shop",
             occurred_at=now - timedelta(hours=2, seconds=i))
        for i in range(120)
    ]  # fmt: skip
    engine = stack.engine()
    with engine.begin() as conn:
        conn.execute(sa.insert(events_log), [{**r, "data": {}, "correlation_id": r["event_id"]} for r in rows + bulk])
        at = now - timedelta(minutes=1)
        conn.execute(
            sa.insert(event_deliveries),
            [
                dict(event_id=ids["storm"], handler="handlers.storm.alert", queue="storm", status="dead", attempts=6,
                     error="RuntimeError('no pager')", created_at=at, updated_at=at),
                dict(event_id=ids["created"], handler="handlers.mail.welcome", queue="mail", status="succeeded",
                     attempts=1, error=None, created_at=at, updated_at=at),
                dict(event_id=ids["birth"], handler="handlers.gone.old_task", queue="gone", status="rejected",
                     attempts=1, error="unknown task", created_at=at, updated_at=at),
            ],
        )  # fmt: skip
    engine.dispose()
    # The router's dead-letter stream (on a Redis Cluster, the order scope's).
    stack.redis.xadd(
        stack.bus().keys.scoped("order.placed").dead_letter, {"id": "1-0", "reason": "not JSON", "raw": "{oops"}
    )
    return {**ids, "bulk": [b["event_id"] for b in bulk], "now": now}


def test_the_explorer_asks_for_basic_auth_and_binds_loopback(stack: Stack) -> None:
    base = _start_explorer(stack)
    for path in ("/", "/events", "/problems"):
        assert _get(base + path, auth=None)[0] == 401
        assert _get(base + path, auth=(AUTH[0], "wrong"))[0] == 401
        assert _get(base + path)[0] == 200
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{base.rsplit(':', 1)[1]}"], capture_output=True,
                               text=True, check=False)  # fmt: skip
    if listening.returncode == 0:
        assert [line.split()[3] for line in listening.stdout.splitlines()] == [base.removeprefix("http://")]


def test_the_explorer_refuses_to_start_behind_the_default_password(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPLORER_")}
    env.update({**stack.env, "EXPLORER_PORT": str(_free_port())})
    for password in (None, "change-me"):
        if password is not None:
            env["EXPLORER_PASSWORD"] = password
        out = subprocess.run([sys.executable, "-m", "project.cli", "explorer"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert out.returncode != 0 and "set EXPLORER_PASSWORD" in out.stderr


@pytest.mark.brokers("redis", "cluster")
def test_the_events_filters_and_pages_show_what_the_record_holds(stack: Stack) -> None:
    record = _record(stack)
    base = _start_explorer(stack)

    def listed(**args: str) -> list[str]:
        status, html = _get(f"{base}/events?{urllib.parse.urlencode(args)}")
        assert status == 200, html[-2000:]
        return _listed(html)

    assert listed(pattern="cosmic.#") == [record["moon"], record["storm"]]
    assert listed(pattern="*.created") == [record["created"], record["old"]]
    assert listed(pattern="#.detected") == [record["storm"]]
    assert listed(user="7") == [record["created"], record["storm"]]
    assert listed(failed="1") == [record["birth"], record["storm"]]  # dead and rejected
    assert listed(pattern="user.#", failed="1") == [record["birth"]]
    assert listed(module="web", since=(record["now"] - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")) == [
        record["birth"], record["created"]
    ]  # fmt: skip
    status, html = _get(f"{base}/events?pattern=a.b.c.d.e")
    assert status == 400 and "can never match" in html

    # Keyset pagination: every event once, newest first, and back.
    status, html = _get(f"{base}/events")
    seen = _listed(html)
    pages = [seen]
    while (older := re.search(r'href="([^"]+)" rel="next"', html)) is not None:
        status, html = _get(base + older.group(1).replace("&amp;", "&"))
        pages.append(_listed(html))
    assert [len(p) for p in pages] == [50, 50, 25]
    every = [e for p in pages for e in p]
    assert len(set(every)) == 125 and every[-1] == record["old"]
    newer = re.search(r'href="([^"]+)" rel="prev"', html)
    assert newer is not None
    assert _listed(_get(base + newer.group(1).replace("&amp;", "&"))[1]) == pages[1]

    status, html = _get(f"{base}/events/{record['storm']}")
    assert status == 200 and 'id="failed-steps"' in html and "RuntimeError(&#x27;no pager&#x27;)" in html
    assert _get(f"{base}/events/{uuid.uuid4()}")[0] == 404
    status, html = _get(f"{base}/users/7")
    assert status == 200 and html.count('<details class="chain') == 2
    status, html = _get(f"{base}/users/{urllib.parse.quote('a/b%41', safe='')}")  # any user id, decoded once
    assert status == 200 and "User a/b%41" in html and "no events for user a/b%41" in html
    status, html = _get(f"{base}/problems")
    assert status == 200
    assert 'data-handler="handlers.storm.alert" data-status="dead"' in html
    assert 'data-handler="handlers.gone.old_task" data-status="rejected"' in html
    assert "not JSON" in html and "{oops" in html  # the router's dead-letter stream
    status, html = _get(f"{base}/?hours=3")
    assert status == 200 and html.count("<svg") == 3 and "cosmic" in html  # a scope in the legend


def test_the_explorer_is_in_the_procfile_and_in_docker_compose() -> None:
    assert "explorer: eventbus explorer" in (ROOT / "Procfile").read_text().splitlines()
    from tests.integration.test_operations import _compose_services

    explorer = _compose_services()["explorer"]
    assert explorer["command"] == ["eventbus", "explorer"]
    assert explorer["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    [port] = explorer["ports"]  # docker-compose 1 writes a string, 2 a mapping
    port = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}:{port['target']}"
    assert port.startswith("127.0.0.1:5556:5556")
    assert explorer["environment"]["EXPLORER_ADDRESS"] == "0.0.0.0"  # inside its container
