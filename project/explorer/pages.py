"""The explorer's pages: each reads the record on the thread pool and renders a template."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa
import tornado.web

from project.errors import EventBusError
from project.explorer import charts, queries, stats
from project.explorer.chain import Chain, build_chain
from project.explorer.filters import Cursor, EventFilter, parse_time
from project.explorer.resources import Explorer

__all__ = [
    "EventPage",
    "EventsPage",
    "Health",
    "NotFound",
    "OverviewPage",
    "ProblemsPage",
    "RedrivePage",
    "UserLookup",
    "UserPage",
]

log = logging.getLogger("eventbus.explorer")

PAGE_SIZE = 50
CHAIN_LIMIT = 500  # events of one chain an event page draws
HOURS = (1, 3, 6, 12, 24)
DEAD_LETTERS = 50


def when(value: datetime | None) -> str:
    """A time as the pages show it: UTC, to the millisecond."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def duration(seconds: float | None) -> str:
    """A step's time, in the unit that reads best."""
    if seconds is None:
        return ""
    if abs(seconds) < 1:
        return f"{seconds * 1000:.0f} ms"
    if abs(seconds) < 120:
        return f"{seconds:.2f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Page(tornado.web.RequestHandler):
    """Basic auth on every request, and what every template may use."""

    explorer: Explorer
    public = False

    def initialize(self, explorer: Explorer) -> None:
        self.explorer = explorer

    def prepare(self) -> None:
        if not self.public and self.current_user is None:
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="eventbus explorer", charset="UTF-8"')
            self.finish("401: the explorer needs EXPLORER_USER and EXPLORER_PASSWORD\n")

    def get_current_user(self) -> str | None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        settings = self.explorer.settings
        # Both compared whatever the first gives, in constant time: the answer tells nothing.
        ok_user = hmac.compare_digest(user.encode(), settings.explorer_user.encode())
        ok_password = hmac.compare_digest(password.encode(), settings.explorer_password.get_secret_value().encode())
        return user if sep and ok_user and ok_password else None

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(when=when, duration=duration, quote=urllib.parse.quote, to_json=_pretty, section="")
        return namespace

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info is not None and not isinstance(exc_info[1], tornado.web.HTTPError):
            reason = f"{type(exc_info[1]).__name__}: {exc_info[1]}"
        self.render("error.html", status=status_code, message=reason)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _link(path: str, args: dict[str, str], **cursor: Cursor) -> str:
    """``path`` with the filter ``args`` and a cursor (``before=`` or ``after=``)."""
    return f"{path}?{urllib.parse.urlencode({**args, **{k: c.encode() for k, c in cursor.items()}})}"


def _failures(conn: sa.Connection, event_ids: list[str]) -> dict[str, tuple[int, int]]:
    """(deliveries, failed deliveries) of each event."""
    if not event_ids:
        return {}
    rows = conn.execute(
        sa.text(
            "SELECT event_id::text AS event_id, count(*) AS n,"
            " count(*) FILTER (WHERE status IN ('failed', 'dead', 'rejected')) AS failed"
            " FROM event_deliveries WHERE event_id = ANY(CAST(:ids AS uuid[])) GROUP BY event_id"
        ),
        {"ids": event_ids},
    )
    return {r.event_id: (int(r.n), int(r.failed)) for r in rows}


class Health(_Page):
    """``/healthz``: answers without auth, for a container's health check."""

    public = True

    def get(self) -> None:
        self.write("ok\n")


class NotFound(_Page):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            raise tornado.web.HTTPError(404)


class OverviewPage(_Page):
    """``/``: events per minute by scope, deliveries by status, publish → handler latency."""

    async def get(self) -> None:
        hours = self.get_argument("hours", "3")
        chosen = float(hours) if hours in {str(h) for h in HOURS} else 3.0
        window = stats.Window(datetime.now(UTC), chosen)
        data = await self.explorer.read(lambda conn: stats.overview(conn, window))
        self.render(
            "overview.html",
            section="overview",
            hours=HOURS,
            data=data,
            events_chart=charts.stacked_bars(
                f"events per minute by scope ({int(window.step_s / 60)}-minute bars, {data.events_total:,} events)",
                data.buckets,
                data.events_per_minute,
            ),
            status_chart=charts.bar_list("deliveries by status (dispatched in this window)", data.deliveries_by_status),
            latency_chart=charts.line_chart(
                f"from publish to handler (ms; {int(window.latency_step_s / 60)}-minute buckets by publish time)",
                data.latency_buckets,
                data.latency_ms,
                " ms",
            ),
        )


class EventsPage(_Page):
    """``/events``: the latest events, newest first, filtered, a page at a time."""

    async def get(self) -> None:
        error = ""
        try:
            flt = EventFilter(
                pattern=self.get_argument("pattern", "").strip() or None,
                user_id=self.get_argument("user", "").strip() or None,
                module=self.get_argument("module", "").strip() or None,
                since=parse_time(self.get_argument("since", "")),
                until=parse_time(self.get_argument("until", "")),
                failed=bool(self.get_argument("failed", "")),
            )
            before = Cursor.decode(self.get_argument("before")) if self.get_argument("before", "") else None
            after = Cursor.decode(self.get_argument("after")) if self.get_argument("after", "") else None
        except (EventBusError, ValueError) as exc:
            error, flt, before, after = str(exc), EventFilter(), None, None
            self.set_status(400)

        def read(conn: sa.Connection) -> tuple[list[queries.EventRow], dict[str, tuple[int, int]], bool]:
            rows = queries.list_events(conn, flt, before=before, after=after, limit=PAGE_SIZE + 1)
            more = len(rows) > PAGE_SIZE
            rows = (rows[1:] if after is not None else rows[:PAGE_SIZE]) if more else rows
            return rows, _failures(conn, [r.event_id for r in rows]), more

        rows, failures, more = await self.explorer.read(read)
        args = flt.query_args()
        older = newer = None
        if rows and (more or after is not None):
            older = _link("/events", args, before=Cursor(rows[-1].occurred_at, rows[-1].id))
        if rows and (before is not None or (after is not None and more)):
            newer = _link("/events", args, after=Cursor(rows[0].occurred_at, rows[0].id))
        self.render(
            "events.html", section="events", flt=flt, rows=rows, failures=failures, error=error, older=older,
            newer=newer, first="/events?" + urllib.parse.urlencode(args),
        )  # fmt: skip


class EventPage(_Page):
    """``/events/<event_id>``: the envelope, its deliveries, and its chain with the failed steps first."""

    async def get(self, event_id: str) -> None:
        def read(conn: sa.Connection) -> tuple[queries.EventRow | None, list[queries.DeliveryRow], Chain | None]:
            event = queries.get_event(conn, event_id.lower())
            if event is None:
                return None, [], None
            deliveries = queries.deliveries_of(conn, [event.event_id])
            events = queries.chain_events(conn, [event.correlation_id or event.event_id], CHAIN_LIMIT + 1)
            if not any(e.event_id == event.event_id for e in events):  # a chain cut before it
                events.append(event)
            chain_deliveries = queries.deliveries_of(conn, [e.event_id for e in events])
            return event, deliveries, build_chain(events, chain_deliveries, truncated=len(events) > CHAIN_LIMIT)

        event, deliveries, chain = await self.explorer.read(read)
        if event is None:
            self.set_status(404)
            self.render("error.html", status=404, message=f"event {event_id} is not on record (or not yet)")
            return
        self.render("event.html", section="events", event=event, deliveries=deliveries, chain=chain)


class UserLookup(_Page):
    """``/users?user=42``: the form in the menu."""

    def get(self) -> None:
        user = self.get_argument("user", "").strip()
        self.redirect(f"/users/{urllib.parse.quote(user, safe='')}" if user else "/events")


class UserPage(_Page):
    """``/users/<user_id>``: the user's events over time, chain by chain, each collapsible."""

    async def get(self, user_id: str) -> None:
        try:
            before = Cursor.decode(self.get_argument("before")) if self.get_argument("before", "") else None
        except ValueError as exc:
            raise tornado.web.HTTPError(400, str(exc)) from exc

        def read(conn: sa.Connection) -> tuple[list[queries.EventRow], list[Chain], list[tuple[datetime, int]]]:
            rows = queries.list_events(conn, EventFilter(user_id=user_id), before=before, limit=PAGE_SIZE)
            cids = list(dict.fromkeys(r.correlation_id or r.event_id for r in rows))
            events = queries.chain_events(conn, cids, CHAIN_LIMIT // 5)
            by_event: dict[str, list[queries.DeliveryRow]] = {}
            for d in queries.deliveries_of(conn, [e.event_id for e in events]):
                by_event.setdefault(d.event_id, []).append(d)
            by_chain: dict[str, list[queries.EventRow]] = {c: [] for c in cids}
            for e in events:
                by_chain.setdefault(e.correlation_id or e.event_id, []).append(e)
            chains = [
                build_chain(by_chain[c], [d for e in by_chain[c] for d in by_event.get(e.event_id, [])])
                for c in cids
                if by_chain[c]
            ]
            days = conn.execute(
                sa.text(
                    "SELECT date_trunc('day', occurred_at) AS day, count(*) AS n FROM events_log"
                    " WHERE user_id = :u AND occurred_at >= now() - interval '30 days' GROUP BY 1 ORDER BY 1"
                ),
                {"u": user_id},
            )
            return rows, chains, [(r.day, int(r.n)) for r in days]

        rows, chains, days = await self.explorer.read(read)
        older = None
        if len(rows) == PAGE_SIZE:
            older = _link(self.request.path, {}, before=Cursor(rows[-1].occurred_at, rows[-1].id))
        per_day = charts.bar_list(
            "events per day, last 30 days (UTC)", [(f"{d:%Y-%m-%d}", n) for d, n in days], colour="#1565c0"
        )
        self.render(
            "user.html", section="users", user_id=user_id, rows=rows, chains=chains, older=older, per_day=per_day
        )


class ProblemsPage(_Page):
    """``/problems``: dead and rejected deliveries by handler and error, and the dead-letter stream."""

    async def get(self) -> None:
        groups = await self.explorer.read(queries.problem_groups)
        run_id = self.get_argument("redrive", "")
        audit = None
        if run_id:
            audit = await self.explorer.read(
                lambda conn: conn.execute(
                    sa.text("SELECT * FROM operations_audit WHERE run_id = :r ORDER BY id DESC LIMIT 1"), {"r": run_id}
                ).first()
            )
        letters = await self.explorer.run(self._dead_letters)
        self.render("problems.html", section="problems", groups=groups, letters=letters, audit=audit)

    def _dead_letters(self) -> list[tuple[str, datetime, str, str]]:
        """The newest entries of the router's dead-letter stream: (id, when, reason, raw).

        On a Redis Cluster, of every scope's dead-letter stream, newest first; each id then
        names its stream.
        """
        found: list[tuple[tuple[int, int], str, dict[str, str]]] = []
        try:
            for keys in self.explorer.scope_keys("dead-letter"):
                entries: Any = self.explorer.client.xrevrange(keys.dead_letter, count=DEAD_LETTERS)
                for entry_id, raw_fields in entries:
                    sid = _text(entry_id)
                    ms, _, seq = sid.partition("-")
                    name = f"{keys.dead_letter} {sid}" if keys.cluster else sid
                    found.append(
                        ((int(ms), int(seq or 0)), name, {_text(k): _text(v) for k, v in (raw_fields or {}).items()})
                    )
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            log.warning("explorer: cannot read the dead-letter stream: %s", exc)
            return []
        found.sort(key=lambda entry: entry[0], reverse=True)
        return [
            (name, datetime.fromtimestamp(at[0] / 1000, UTC), fields.get("reason", ""), fields.get("raw", "")[:2000])
            for at, name, fields in found[:DEAD_LETTERS]
        ]


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


class RedrivePage(_Page):
    """``POST /problems/redrive``: confirm, then send one problem group again with ``eventbus redrive``'s code.

    The form names the group by handler, status and :func:`~project.explorer.queries.error_key`
    (empty: the group without an error); the exact error is looked up again here.
    """

    async def post(self) -> None:
        handler = self.get_argument("handler")
        status = self.get_argument("status")
        key = self.get_argument("error_key", "")
        if status not in queries.PROBLEM_STATUSES:
            raise tornado.web.HTTPError(400, f"status must be one of {', '.join(queries.PROBLEM_STATUSES)}")

        def read(conn: sa.Connection) -> tuple[str | None, int]:
            error = queries.find_error(conn, handler, status, key) if key else None
            if key and error is None:
                return None, 0
            return error, queries.problem_count(conn, handler, status, error)

        error, count = await self.explorer.read(read)
        if not self.get_argument("confirm", "") or count == 0:
            self.render("redrive.html", section="problems", handler=handler, status=status, error=error, key=key,
                        count=count)  # fmt: skip
            return
        from project.operations import DeliveryFilter, OperationResult, redrive

        actor = f"explorer:{self.current_user}"

        def run() -> OperationResult:
            flt = DeliveryFilter(statuses=(status,), handler=handler, error=error)
            return redrive(self.explorer.settings, flt, actor=actor, registry=self.explorer.registry())

        result = await self.explorer.run(run)
        log.info("explorer: %s redrove %s (%s): %d sent of %d", actor, handler, status, result.sent, result.selected)
        self.redirect(f"/problems?redrive={urllib.parse.quote(result.run_id)}")
