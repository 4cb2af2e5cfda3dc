"""The events explorer's pages on a large record: each page's HTTP request, in ms.

Fills a private database with ``BENCH_EXPLORER_EVENTS`` events (default 1,000,000) and three
deliveries each, generated in SQL (``generate_series``: seconds, not minutes), spread over
the last ``BENCH_EXPLORER_SPAN_H`` hours (default 72). Then serves the explorer in this
process, on loopback, and times every page through HTTP: the queries, the rendering and the
request, as an operator's browser waits for them. Each page is fetched once to warm it, then
``rounds`` times; the median is quoted, against the same server's bare ``/healthz`` answer
(the floor of one request) as the baseline.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from bench.harness import ADMIN_DSN, DB_NAME, MACHINE, PREFIX, ROOT, Result

__all__ = ["bench_explorer", "fill"]

#: A page answers within this, or the target is not met ("well under a second").
TARGET_MS = 300.0
_USER, _PASSWORD = "bench", "bench-password"
_DB = f"{DB_NAME}_explorer"


def _url(db: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + f"/{db}"


def _admin(sql: str) -> None:
    engine = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(sql))
    engine.dispose()


# An id that sorts like a random UUID (so the indexes on it are as scattered as production's)
# but costs far less than md5(): a 32-bit hash of the number, then the number itself.
_ID = "CAST(lpad(to_hex(hashint8({0})), 8, '0') || lpad(to_hex({0}), 24, '0') AS uuid)"

# Chains of three: a root (hop 0), the event a handler published for it, and the next one.
# 1% of the roots are cosmic (global: no user); 0.1% of them come from the module "cli".
_EVENTS = f"""
INSERT INTO events_log (event_id, event_type, user_id, user_id_json, module, data, occurred_at, causation_id,
                        correlation_id, hops)
SELECT {_ID.format("i")},
       CASE i % 3
         WHEN 0 THEN CASE WHEN j % 200 = 0 THEN 'cosmic.solar_storm.detected'
                          WHEN j % 100 = 0 THEN 'cosmic.full_moon'
                          ELSE (ARRAY['user.birth_data.updated', 'user.created', 'user.profile.updated',
                                      'billing.invoice.paid', 'billing.invoice.created', 'notification.email.sent',
                                      'order.item.added', 'order.placed'])[1 + j % 8] END
         WHEN 1 THEN (ARRAY['module.profile.calculated', 'module.lunar.calculated', 'module.score.updated'])[1 + j % 3]
         ELSE (ARRAY['synthesis.completed', 'synthesis.refreshed'])[1 + j % 2]
       END,
       CASE WHEN j % 100 = 0 THEN NULL ELSE (j * 7919 % :users)::text END,
       CASE WHEN j % 100 = 0 THEN NULL ELSE to_jsonb(j * 7919 % :users) END,
       CASE i % 3 WHEN 0 THEN CASE WHEN j % 1000 = 1 THEN 'cli' ELSE 'web' END WHEN 1 THEN 'solar' ELSE 'synthesis' END,
       jsonb_build_object('n', i),
       now() - CAST(:span AS interval) + (3 * j) * CAST(:step AS interval) + (i % 3) * interval '15 milliseconds',
       CASE WHEN i % 3 = 0 THEN NULL ELSE {_ID.format("i - 1")} END,
       {_ID.format("3 * j")},
       i % 3
FROM generate_series(CAST(0 AS bigint), :n - 1) AS i, LATERAL (SELECT i / 3 AS j) AS g
"""

# Three deliveries per event: 1% dead (four different errors), 0.3% rejected, 0.2% retrying,
# the rest succeeded. task_id is left null: the explorer then derives it as the writer does.
_DELIVERIES = """
INSERT INTO event_deliveries (event_id, handler, queue, status, attempts, error, created_at, updated_at)
SELECT e.event_id, 'handlers.' || split_part(e.event_type, '.', 1) || '.on_' || k, split_part(e.event_type, '.', 1),
       CASE WHEN x < 10 THEN 'dead' WHEN x < 13 THEN 'rejected' WHEN x < 15 THEN 'retrying' ELSE 'succeeded' END,
       CASE WHEN x < 10 THEN 6 WHEN x < 15 THEN 2 ELSE 1 END,
       CASE WHEN x < 10 THEN (ARRAY['RuntimeError(''boom'')', 'TimeoutError()', 'KeyError(''user'')',
                                    'SoftTimeLimitExceeded()'])[1 + x % 4]
            WHEN x < 13 THEN 'unknown task' END,
       e.occurred_at + (k + 1) * interval '1 millisecond',
       e.occurred_at + (k + 1) * interval '1 millisecond' + (5 + x % 60) * interval '1 millisecond'
FROM events_log e CROSS JOIN generate_series(1, 3) AS k, LATERAL (SELECT abs(hashint8(e.id * 4 + k)) % 1000 AS x) AS h
"""

_TABLES = "('events_log'::regclass, 'event_deliveries'::regclass)"


def fill(url: str, events: int, span_h: float) -> float:
    """Fill the (migrated, empty) database at ``url``; return the seconds it took.

    The database is a throwaway, so the load takes the fast road: the two tables become
    UNLOGGED (no WAL; a page read is the same as from a logged table) and their secondary
    indexes and unique constraints are dropped, then built again, exactly as the
    migrations declared them, once the rows are in.
    """
    started = time.perf_counter()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '256MB'"))
        for table in ("event_deliveries", "events_log"):
            conn.execute(sa.text(f"ALTER TABLE {table} SET UNLOGGED"))
        constraints = list(conn.execute(sa.text(
            f"SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            f" WHERE conrelid IN {_TABLES} AND contype = 'u'"
        )))  # fmt: skip
        indexes = list(conn.execute(sa.text(
            f"SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
            f" WHERE indrelid IN {_TABLES} AND NOT indisprimary"
            f" AND indexrelid NOT IN (SELECT conindid FROM pg_constraint WHERE conrelid IN {_TABLES})"
        )))  # fmt: skip
        for table, name, _ in constraints:
            conn.execute(sa.text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
        for name, _ in indexes:
            conn.execute(sa.text(f"DROP INDEX {name}"))
        params = {
            "n": events,
            "users": max(10, events // 100),
            "span": f"{span_h} hours",
            "step": f"{span_h * 3600 / events:.9f} seconds",
        }
        conn.execute(sa.text(_EVENTS), params)
        conn.execute(sa.text(_DELIVERIES))
        for table, name, definition in constraints:
            conn.execute(sa.text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))
        for _, definition in indexes:
            conn.execute(sa.text(definition))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # As autovacuum would leave a table that has stopped growing: statistics for the
        # planner, and the visibility map that lets an index-only scan skip the heap.
        conn.execute(sa.text("VACUUM ANALYZE events_log"))
        conn.execute(sa.text("VACUUM ANALYZE event_deliveries"))
    engine.dispose()
    return time.perf_counter() - started


@contextmanager
def _served(url: str) -> Iterator[str]:
    """The explorer on a free loopback port, in a thread of this process; yields its base URL."""
    import tornado.httpserver
    import tornado.netutil

    from project.explorer.app import make_app
    from project.explorer.resources import Explorer
    from project.settings import Settings

    settings = Settings(database_url=url, events_prefix=PREFIX, explorer_user=_USER, explorer_password=_PASSWORD)  # type: ignore[call-arg]
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    explorer = Explorer(settings)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            server = tornado.httpserver.HTTPServer(make_app(explorer))
            server.add_sockets([sock])
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, name="explorer", daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        explorer.close()


def _get(url: str) -> float:
    """Fetch ``url`` with the bench's credentials; return the ms it took (the whole body read)."""
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{_USER}:{_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


def _pages(url: str) -> list[tuple[str, str]]:
    """Every page the bench times, with a realistic target of each kind picked from the record."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        middle = conn.execute(
            sa.text("SELECT occurred_at, id FROM events_log ORDER BY id OFFSET (SELECT count(*) / 2 FROM events_log)")
        ).first()
        failed_root: Any = conn.execute(
            sa.text(
                "SELECT e.correlation_id::text AS root, e.user_id FROM event_deliveries d JOIN events_log e"
                " ON e.event_id = d.event_id WHERE d.status = 'dead' AND e.user_id IS NOT NULL"
                " ORDER BY d.id DESC LIMIT 1"
            )
        ).first()
    engine.dispose()
    from project.explorer.filters import Cursor

    deep = Cursor(middle.occurred_at, middle.id).encode() if middle else ""
    q = urllib.parse.urlencode
    return [
        ("overview (last 3 h)", "/"),
        ("events: newest", "/events"),
        ("events: half-way down (keyset)", "/events?" + q({"before": deep})),
        ("events: pattern cosmic.# (1%)", "/events?" + q({"pattern": "cosmic.#"})),
        ("events: pattern *.*.calculated", "/events?" + q({"pattern": "*.*.calculated"})),
        ("events: one user", "/events?" + q({"user": failed_root.user_id if failed_root else "1"})),
        ("events: module cli (0.1%)", "/events?" + q({"module": "cli"})),
        ("events: has failed deliveries", "/events?" + q({"failed": "1"})),
        ("events: cosmic.# + failed", "/events?" + q({"pattern": "cosmic.#", "failed": "1"})),
        ("event: chain with a dead step", f"/events/{failed_root.root}" if failed_root else "/events"),
        ("user: chains", f"/users/{failed_root.user_id}" if failed_root else "/users/1"),
        ("problems", "/problems"),
    ]


def bench_explorer(events: int, rounds: int) -> list[Result]:
    """Fill a private database with ``events`` events (3 deliveries each), then time each page."""
    events = int(os.environ.get("BENCH_EXPLORER_EVENTS", events))
    span_h = float(os.environ.get("BENCH_EXPLORER_SPAN_H", "72"))
    url = _url(_DB)
    _admin(f'DROP DATABASE IF EXISTS "{_DB}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{_DB}"')
    try:
        subprocess.run([sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        fill_s = fill(url, events, span_h)
        results = []
        with _served(url) as base:
            floor = statistics.median(_get(base + "/healthz") for _ in range(max(5, rounds)))
            for name, path in _pages(url):
                _get(base + path)
                ms = statistics.median(_get(base + path) for _ in range(rounds))
                note = f"{events:,} events, {3 * events:,} deliveries over {span_h:g} h (filled in {fill_s:.0f} s)"
                ratio = round(ms / floor, 1)
                target = f"< {TARGET_MS:g} ms"
                results.append(Result(f"explorer {name}", round(ms, 2), round(floor, 2), ratio, target, "ms",
                                      ms < TARGET_MS, MACHINE, note))  # fmt: skip
        return results
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{_DB}" WITH (FORCE)')
