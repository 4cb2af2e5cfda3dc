"""The explorer's parts that need no server: filters, cursors, the chain's tree, charts, auth."""

from __future__ import annotations

import asyncio
import base64
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import tornado.httpserver
import tornado.netutil

from project.context import derived_event_id
from project.errors import InvalidPattern
from project.explorer import add_commands, charts
from project.explorer.app import make_app
from project.explorer.chain import build_chain
from project.explorer.filters import Cursor, EventFilter, parse_time
from project.explorer.pages import duration
from project.explorer.queries import DeliveryRow, EventRow
from project.explorer.resources import Explorer
from project.explorer.stats import Window
from project.messages import delivery_task_id
from project.settings import Settings

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _event(n: int, event_id: str, event_type: str, *, cause: str | None = None, root: str | None = None,
           ms: int = 0, replay_of: str | None = None) -> EventRow:  # fmt: skip
    return EventRow(
        id=n, event_id=event_id, event_type=event_type, user_id="7", module="m",
        occurred_at=T0 + timedelta(milliseconds=ms), causation_id=cause, correlation_id=root or event_id,
        hops=0 if cause is None else 1, version=None, replay_of=replay_of,
    )  # fmt: skip


def _delivery(n: int, event: EventRow, handler: str, status: str = "succeeded", took_ms: int = 10) -> DeliveryRow:
    at = event.occurred_at + timedelta(milliseconds=took_ms)
    return DeliveryRow(
        id=n, event_id=event.event_id, handler=handler, queue="q", task_id=None, status=status, attempts=1,
        error="RuntimeError('x')" if status == "dead" else None, created_at=event.occurred_at, updated_at=at,
        redriven_at=None, redrives=0,
    )  # fmt: skip


ROOT = "00000000-0000-4000-8000-000000000001"


def test_a_cursor_survives_its_trip_through_a_url() -> None:
    cursor = Cursor(datetime(2026, 11, 28, 15, 20, 3, 123456, tzinfo=UTC), 42)
    assert Cursor.decode(cursor.encode()) == cursor
    with pytest.raises(ValueError, match="not a cursor"):
        Cursor.decode("yesterday")


def test_a_time_without_a_zone_is_utc() -> None:
    assert parse_time("2026-11-28T15:20") == datetime(2026, 11, 28, 15, 20, tzinfo=UTC)
    assert parse_time("") is None


def test_a_filter_refuses_a_pattern_that_cannot_match_and_an_empty_window() -> None:
    with pytest.raises(InvalidPattern):
        EventFilter(pattern="a.b.c.d.e")
    with pytest.raises(ValueError, match="empty"):
        EventFilter(since=T0, until=T0)
    flt = EventFilter(pattern="cosmic.#", failed=True, since=T0)
    assert flt.query_args() == {"pattern": "cosmic.#", "failed": "1", "since": "2026-11-28T12:00:00"}


def test_the_chain_attributes_each_published_event_to_the_handler_that_published_it() -> None:
    root = _event(1, ROOT, "user.birth_data.updated")
    solar, memory = "handlers.solar.SolarModule.recalculate", "handlers.memory.Memory.invalidate_user"
    # What the solar handler's delivery published, as a worker derives the id.
    child_id = derived_event_id(delivery_task_id(ROOT, solar), 1)
    child = _event(2, child_id, "module.profile.calculated", cause=ROOT, root=ROOT, ms=40)
    stray = _event(3, "00000000-0000-4000-8000-000000000003", "user.created", cause=ROOT, root=ROOT, ms=50)
    copy = _event(4, "00000000-0000-4000-8000-000000000004", "user.birth_data.updated", root=ROOT, ms=90,
                  replay_of=ROOT)  # fmt: skip
    dead = "handlers.synthesis.on_profile"
    # The module.error report of the dead delivery, as the delivery policy derives its id.
    report_id = derived_event_id(f"{delivery_task_id(child_id, dead)}/module.error", 1)
    report = _event(5, report_id, "module.error", cause=child_id, root=ROOT, ms=80)
    deliveries = [
        _delivery(1, root, memory, took_ms=5),
        _delivery(2, root, solar, took_ms=30),
        _delivery(3, child, dead, status="dead", took_ms=70),
    ]
    chain = build_chain([root, child, stray, copy, report], deliveries)
    drawn = [(line.kind, line.depth, line.delivery.handler if line.delivery else line.event.event_type)
             for line in chain.lines]  # fmt: skip
    assert drawn == [
        ("event", 0, "user.birth_data.updated"),
        ("delivery", 1, memory),
        ("delivery", 1, solar),
        ("event", 2, "module.profile.calculated"),  # under the solar delivery, not the memory one
        ("delivery", 3, dead),
        ("event", 4, "module.error"),  # the dead delivery's report, under it
        ("event", 1, "user.created"),  # published outside any delivery of the root
        ("event", 1, "user.birth_data.updated"),  # the replay's copy, under its original
    ]
    assert [line.note for line in chain.lines if line.kind == "event"][1:] == [
        "", "its failure report", "published outside a handler run", f"replay of {ROOT}"
    ]  # fmt: skip
    [failed] = chain.failed
    assert failed.delivery is not None and failed.delivery.status == "dead" and failed.anchor == "d3"
    took = {line.delivery.handler if line.delivery else line.event.event_type: line.took_s for line in chain.lines}
    assert took[solar] == pytest.approx(0.030)  # the delivery's last update after its event's publish
    assert took["module.profile.calculated"] == pytest.approx(0.040)  # after its cause's publish
    assert (chain.events, chain.deliveries) == (5, 3)


def test_a_chain_whose_root_is_missing_or_whose_causes_loop_still_draws_every_event() -> None:
    orphan = _event(2, "00000000-0000-4000-8000-000000000002", "module.profile.calculated", cause=ROOT, root=ROOT)
    chain = build_chain([orphan], [])
    assert [line.event.event_id for line in chain.lines] == [orphan.event_id]
    a, b = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    looped = build_chain([_event(1, a, "x.a", cause=b, root=a), _event(2, b, "x.b", cause=a, root=a)], [])
    assert sorted(line.event.event_id for line in looped.lines) == [a, b]


def test_charts_are_inline_svg_with_escaped_labels() -> None:
    buckets = [T0 + timedelta(minutes=i) for i in range(3)]
    svg = charts.stacked_bars("events <per> minute", buckets, {"cosmic": [1, 0, 2], "user<script>": [3, 3, 3]})
    assert svg.count("<rect") == 5 and "<script>" not in svg and "&lt;per&gt;" in svg
    line = charts.line_chart("latency", buckets, {"p50": [1.0, None, 3.0]}, " ms")
    assert "<svg" in line and line.count("<circle") == 2
    assert "nothing in this window" in charts.bar_list("by status", [])


def test_the_overview_window_keeps_its_buckets_few() -> None:
    window = Window(T0, 24)
    assert window.step_s == 480 and len(window.buckets(window.step_s)) <= 181
    assert window.latency_step_s == 2400
    assert Window(T0, 1).step_s == 60


def test_durations_read_in_the_unit_that_fits() -> None:
    assert [duration(s) for s in (0.0123, 1.5, 300, 9000)] == ["12 ms", "1.50 s", "5.0 min", "2.5 h"]


def test_the_command_is_registered_with_its_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explorer", "--address", "0.0.0.0", "--port", "8080"])
    assert (args.address, args.port) == ("0.0.0.0", 8080)


@pytest.fixture
def served() -> Iterator[str]:
    """The explorer in a thread, on settings that point nowhere: only what needs no data answers."""
    settings = Settings(
        database_url="postgresql+psycopg2://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0",
        explorer_user="ops", explorer_password="s3cret",
    )  # type: ignore[call-arg]  # fmt: skip
    explorer = Explorer(settings, engine=sa.create_engine(settings.database_url, poolclass=sa.pool.NullPool))
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            tornado.httpserver.HTTPServer(make_app(explorer)).add_sockets([sock])
            started.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    sock.close()
    explorer.close()


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_every_page_asks_for_basic_auth_and_refuses_a_wrong_password(served: str) -> None:
    for path in ("/", "/events", "/problems", "/users/7", f"/events/{ROOT}", "/nowhere"):
        assert _status(served + path) == 401, path
        assert _status(served + path, ("ops", "wrong")) == 401, path
        assert _status(served + path, ("admin", "s3cret")) == 401, path
    assert _status(served + "/nowhere", ("ops", "s3cret")) == 404
    assert _status(served + "/healthz") == 200  # for a container's health check: says "ok", nothing else


def test_a_post_without_the_forms_xsrf_token_is_refused(served: str) -> None:
    request = urllib.request.Request(served + "/problems/redrive", data=b"handler=h&status=dead", method="POST")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"ops:s3cret").decode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    caught.value.close()
    assert caught.value.code == 403
