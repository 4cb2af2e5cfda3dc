"""Operating on the record: redrive failed deliveries, replay past events, backfill a handler.

Every event and delivery is in PostgreSQL (``events_log``, ``event_deliveries``); these send
work again from there, through the same task messages the router builds:

- :func:`redrive` sends a ``dead`` or ``rejected`` delivery again: the same (event, handler)
  delivery, the same task id. Its attempts keep counting (a fresh allowance of
  ``max_retries + 1`` on top of those used), ``redriven_at``/``redrives`` say it was
  redriven, its record is ``dispatched`` again (so the reconciler watches it like any other),
  and the done mark keeps the handler's effect to at most once.
- :func:`replay` delivers past events again to today's subscriptions, or to one handler. A
  replayed delivery is a copy of the event under a new id, recorded with ``replay_of`` =
  the original, so the record tells it from a first delivery.
- :func:`backfill` is a replay to one new handler: how a new subscriber gets past events.

Each send is one Redis script that checks and sends together, so a run that is stopped
(Ctrl-C, a crash) and started again sends nothing twice: a redrive sends only deliveries
whose Redis state is still settled, a replay marks each copy as sent in the same call. Runs
are paced (``per_second``), can be dry runs, show their progress and write one line to
``operations_audit``: who, when, which filter, how many.

On a Redis Cluster each script touches only the keys of the event's scope (its delivery state,
replay mark and log buffer share a slot, :mod:`project.keys`), and the tasks go to RabbitMQ,
published and confirmed before or after the script as with RabbitMQ beside one Redis.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa

from project.broker import sender_for
from project.bus import EventBus
from project.errors import EventBusError
from project.messages import delivery_task_id, task_message
from project.patterns import PatternTrie, validate_pattern
from project.reconciler import record_envelope
from project.records import delivery_record, event_record
from project.redis_conn import keys_for, redis_client, require_amqp_on_cluster
from project.registry import Registry, Subscription
from project.settings import Settings
from project.tables import event_deliveries, operations_audit

__all__ = [
    "DeliveryFilter",
    "OperationResult",
    "ReplayFilter",
    "backfill",
    "redrive",
    "replay",
]

log = logging.getLogger("eventbus.operations")

_BATCH = 500
_REPLAY_NAMESPACE = uuid.UUID("5d0f3c52-8a0e-4d8b-9a57-2f9b6c1e7d10")
_REPLAY_MARK_TTL_S = 90 * 86400
REDRIVABLE = ("dead", "rejected")

# KEYS: delivery hash, log buffer, lease (also the delivery's gate: 'done' or 'dead' once
# settled, else its running process' token; see project.delivery), and the queue when the
# script pushes. ARGV: task message, attempts on record, max attempts, state ttl s, log
# record, push ('1': LPUSH the message on KEYS[4]; '0': Celery's queues are on RabbitMQ and
# the caller publishes it). Sends only a delivery that is settled in Redis (or forgotten):
# one already redriven and not settled again is in flight, so a second run skips it. On a
# Redis Cluster the delivery's keys and the log buffer are those of the event's scope (one
# slot), and there is no queue key (RabbitMQ).
_REDRIVE_LUA = """
local st = redis.call('HGET', KEYS[1], 'state')
local gate = redis.call('GET', KEYS[3])
if gate == 'done' then return 'done' end
if gate and gate ~= 'dead' and not st then return 'running' end
if st and st ~= 'dead' then return st end
local a = tonumber(redis.call('HGET', KEYS[1], 'attempts') or ARGV[2])
if a < tonumber(ARGV[2]) then a = tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'state', 'redriven', 'attempts', a, 'budget', a + tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
if gate == 'dead' then redis.call('DEL', KEYS[3]) end
if ARGV[6] == '1' then redis.call('LPUSH', KEYS[4], ARGV[1]) end
redis.call('XADD', KEYS[2], '*', 'r', ARGV[5])
return 'sent'
"""

# RabbitMQ: a redrive whose publish failed is settled again, so the next run sends it.
# KEYS: delivery hash, lease (the gate). ARGV: state ttl s.
_UNREDRIVE_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'redriven' then
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('SET', KEYS[2], 'dead', 'EX', ARGV[1])
end
return 0
"""

# KEYS: sent mark, log buffer, queue of each delivery. ARGV: mark ttl s, log record, the task
# message of each delivery (ARGV[i] goes to KEYS[i]). A copy already marked is never sent again.
# On a Redis Cluster the mark and the log buffer are the event's scope's, and no queue is given.
_REPLAY_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 3, #KEYS do redis.call('LPUSH', KEYS[i], ARGV[i]) end
redis.call('XADD', KEYS[2], '*', 'r', ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """Which deliveries :func:`redrive` sends: all given conditions hold."""

    statuses: tuple[str, ...] = REDRIVABLE
    handler: str | None = None
    pattern: str | None = None  # of event types: 'cosmic.#'
    user_id: str | None = None
    since: datetime | None = None  # of the event's publish time
    until: datetime | None = None
    error: str | None = None  # the delivery's last error, exactly (a group on the explorer's problems page)

    def __post_init__(self) -> None:
        bad = [s for s in self.statuses if s not in REDRIVABLE]
        if bad or not self.statuses:
            raise EventBusError(f"redrive sends deliveries that are {' or '.join(REDRIVABLE)}, not {bad or 'none'}")
        if self.pattern is not None:
            validate_pattern(self.pattern)


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which past events :func:`replay` delivers again, and to which handler (default: all)."""

    pattern: str = "#"
    since: datetime | None = None
    until: datetime | None = None
    handler: str | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)


@dataclass(slots=True)
class OperationResult:
    """How a run went: how many it selected, sent and skipped (already sent or in flight)."""

    operation: str
    run_id: str
    dry_run: bool
    selected: int = 0
    sent: int = 0
    skipped: int = 0
    interrupted: bool = False
    lines: list[str] = field(default_factory=list)  # what a dry run would send


class Progress(Protocol):
    """Shows a run's progress: :func:`project.operations_cli.terminal_progress` picks one for a terminal."""

    def start(self, total: int) -> None: ...
    def advance(self, done: int, sent: int) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, done: int, sent: int) -> None: ...
    def close(self) -> None: ...


class _Pacer:
    """At most ``per_second`` sends a second; waiting ends early if ``stop`` is set."""

    def __init__(self, per_second: float | None, stop: threading.Event) -> None:
        self.interval = 1 / per_second if per_second else 0.0
        self.stop = stop
        self.next_at = time.monotonic()

    def wait(self) -> bool:
        """Wait for the next slot; False if the run was stopped meanwhile."""
        if self.interval:
            delay = self.next_at - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return False
            self.next_at = max(self.next_at, time.monotonic()) + self.interval
        return not self.stop.is_set()


class _Context:
    """What every operation needs: settings, Redis, PostgreSQL, keys and subscriptions."""

    def __init__(self, settings: Settings, registry: Registry | None) -> None:
        self.settings = settings
        self.keys = keys_for(settings)
        require_amqp_on_cluster(settings)
        self.client: Any = redis_client(settings)
        self.engine = sa.create_engine(settings.database_url, pool_pre_ping=True, poolclass=sa.pool.NullPool)
        self.sender = sender_for(settings)  # Celery's queues on RabbitMQ, else None
        if registry is None:
            bus = EventBus(settings)
            bus.load_modules()
            registry = bus.registry
        self.registry = registry

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.client.close()
        self.engine.dispose()

    def finish(self, progress: Progress, actor: str, result: OperationResult, flt: Any) -> None:
        """End a run, however it ended: the progress display, the audit line, the connections."""
        progress.close()
        try:
            self.audit(actor, result, flt)
        finally:
            self.close()

    def event_types(self, conn: sa.Connection, pattern: str | None, *, every: bool = False) -> list[str] | None:
        """The recorded event types ``pattern`` matches (the dispatcher's matcher), or None for
        all (``every``: the list of all rather than None)."""
        if (pattern is None or pattern == "#") and not every:
            return None
        pattern = pattern or "#"
        trie: PatternTrie[str] = PatternTrie()
        trie.insert(pattern, pattern)
        names = conn.execute(sa.text("SELECT DISTINCT event_type FROM events_log")).scalars()
        return [n for n in names if trie.match(n)]

    def audit(self, actor: str, result: OperationResult, flt: Any) -> None:
        outcome = "interrupted" if result.interrupted else "finished"
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(operations_audit).values(
                    actor=actor,
                    operation=result.operation,
                    run_id=result.run_id,
                    filter=_jsonable(flt),
                    dry_run=result.dry_run,
                    outcome=outcome,
                    selected=result.selected,
                    sent=result.sent,
                    skipped=result.skipped,
                )
            )
        log.info(
            "%s by %s (%s), run %s, filter %s: %d selected, %d sent, %d skipped%s",
            result.operation, actor, outcome, result.run_id, json.dumps(_jsonable(flt)), result.selected,
            result.sent, result.skipped, " (dry run)" if result.dry_run else "",
        )  # fmt: skip


def _jsonable(flt: Any) -> dict[str, Any]:
    out = {}
    for key, value in asdict(flt).items():
        if value is None:
            continue
        out[key] = (
            value.isoformat() if isinstance(value, datetime) else list(value) if isinstance(value, tuple) else value
        )
    return out


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- redrive ------------------------------------------------------------------------------

_REDRIVE_COLUMNS = """
    d.id AS row_id, d.event_id::text AS event_id, d.handler, d.queue, d.task_id::text AS task_id, d.status,
    d.attempts, d.error, e.event_type, e.user_id, e.user_id_json, e.data, e.occurred_at, e.module,
    e.causation_id::text AS causation_id, e.correlation_id::text AS correlation_id, e.hops, e.version,
    e.replay_of::text AS replay_of
"""


def _where(
    first: str, params: dict[str, Any], conditions: tuple[tuple[str, str, Any], ...], types: list[str] | None
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause: ``first``, then ``column :key`` for each condition whose value is set."""
    clauses = [first]
    for column, key, value in conditions:
        if value is not None:
            clauses.append(f"{column} :{key}")
            params[key] = value
    if types is not None:
        clauses.append("e.event_type = ANY(:types)")
        params["types"] = types
    return " AND ".join(clauses), params


def _redrive_where(flt: DeliveryFilter, types: list[str] | None) -> tuple[str, dict[str, Any]]:
    conditions = (
        ("d.handler =", "handler", flt.handler),
        ("e.user_id =", "user_id", flt.user_id),
        ("e.occurred_at >=", "since", flt.since),
        ("e.occurred_at <", "until", flt.until),
        ("d.error =", "error", flt.error),
    )
    return _where("d.status = ANY(:statuses)", {"statuses": list(flt.statuses)}, conditions, types)


def redrive(
    settings: Settings,
    flt: DeliveryFilter,
    *,
    dry_run: bool = False,
    per_second: float | None = None,
    actor: str | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
) -> OperationResult:
    """Send the deliveries ``flt`` selects again (see the module's docstring).

    Returns once every selected delivery was sent or skipped, or ``stop`` was set (then
    ``interrupted``: run it again to go on). Writes one audit line, dry runs too.

    Raises:
        EventBusError: a bad filter; ``ConfigurationError``: a Redis Cluster with Celery's
            queues not on RabbitMQ.
        redis.RedisError, sqlalchemy.exc.SQLAlchemyError: Redis or PostgreSQL failed; what
            was sent is sent, and a new run goes on from there.
    """
    stop = stop or threading.Event()
    progress = progress or _NoProgress()
    ctx = _Context(settings, registry)
    run_id = uuid.uuid4().hex[:12]
    result = OperationResult("redrive", run_id, dry_run)
    script = ctx.client.register_script(_REDRIVE_LUA)
    pacer = _Pacer(per_second, stop)
    try:
        with ctx.engine.connect() as conn:
            where, params = _redrive_where(flt, ctx.event_types(conn, flt.pattern))
            base = f"FROM event_deliveries d JOIN events_log e ON e.event_id = d.event_id WHERE {where}"
            result.selected = int(conn.execute(sa.text(f"SELECT count(*) {base}"), params).scalar_one())
        progress.start(result.selected)
        after, done = 0, 0
        while not stop.is_set():
            with ctx.engine.connect() as conn:
                rows = list(
                    conn.execute(
                        sa.text(f"SELECT {_REDRIVE_COLUMNS} {base} AND d.id > :after ORDER BY d.id LIMIT :limit"),
                        {**params, "after": after, "limit": _BATCH},
                    )
                )
            if not rows:
                break
            sent: list[tuple[str, str]] = []
            for row in rows:
                if not pacer.wait():
                    break
                after, done = row.row_id, done + 1
                if _redrive_one(ctx, script, row, dry_run, actor, result):
                    sent.append((row.event_id, row.handler))
                progress.advance(done, result.sent)
            if sent:
                _mark_redriven(ctx, sent)
        result.interrupted = stop.is_set() and done < result.selected
    finally:
        ctx.finish(progress, _actor(actor), result, flt)
    return result


def _redrive_one(
    ctx: _Context, script: Any, row: Any, dry_run: bool, actor: str | None, result: OperationResult
) -> bool:
    sub = ctx.registry.get(row.handler)
    queue = row.queue or (sub.queue if sub else None)
    task_id = row.task_id or delivery_task_id(row.event_id, row.handler)
    if queue is None:
        result.skipped += 1
        result.lines.append(f"skip {row.handler} for event {row.event_id}: its queue is unknown")
        return False
    if dry_run:
        result.lines.append(
            f"would send {row.handler} for event {row.event_id} ({row.event_type}, {row.status}, "
            f"{row.attempts} attempts) to {queue!r}"
        )
        return False
    task = task_message(
        task_name=row.handler, task_id=task_id, queue=queue, envelope_json=record_envelope(row),
        event_type=row.event_type, event_id=row.event_id,
    )  # fmt: skip
    max_attempts = (sub.max_retries if sub else ctx.settings.delivery_max_retries) + 1
    note = f"redriven by {_actor(actor)} (was {row.status} after {row.attempts} attempts)"
    push = ctx.sender is None
    keys = ctx.keys.scoped(row.event_type)  # on a Redis Cluster, the event's scope: one slot
    verdict = script(
        keys=[keys.delivery(task_id), keys.log_buffer, keys.lease(task_id),
              *([keys.celery_queue(queue)] if push else [])],
        args=[task.redis_form() if push else "", row.attempts, max_attempts, ctx.settings.delivery_done_ttl_s,
              delivery_record(row.event_id, row.handler, "dispatched", None, note), "1" if push else "0"],
    )  # fmt: skip
    verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    if verdict == "sent":
        if ctx.sender is not None:
            try:
                ctx.sender.send([task])
            except BaseException:
                ctx.client.eval(
                    _UNREDRIVE_LUA, 2, keys.delivery(task_id), keys.lease(task_id), ctx.settings.delivery_done_ttl_s
                )
                raise
        result.sent += 1
        return True
    result.skipped += 1
    result.lines.append(f"skip {row.handler} for event {row.event_id}: already {verdict}")
    return False


def _mark_redriven(ctx: _Context, sent: list[tuple[str, str]]) -> None:
    # 'dispatched' again, as of now: a later run does not select it, and if its message is
    # lost before a worker starts it, the reconciler sends it again (RECONCILE_AFTER_S), as
    # for any dispatched delivery. The worker's records (attempt + 1) then move it on.
    d = event_deliveries
    with ctx.engine.begin() as conn:
        conn.execute(
            sa.update(d)
            .where(sa.tuple_(d.c.event_id, d.c.handler).in_(sent))
            .values(
                redriven_at=sa.func.now(),
                redrives=d.c.redrives + 1,
                # A worker quicker than this update has already moved it on: leave its status.
                status=sa.case((d.c.status.in_(REDRIVABLE), "dispatched"), else_=d.c.status),
                updated_at=sa.case((d.c.status.in_(REDRIVABLE), sa.func.now()), else_=d.c.updated_at),
            )
        )


# -- replay and backfill ------------------------------------------------------------------


def _replay_key(flt: ReplayFilter) -> str:
    return hashlib.sha256(json.dumps(_jsonable(flt), sort_keys=True).encode()).hexdigest()[:16]


def replay_event_id(run_id: str, event_id: str) -> str:
    """The id of the copy of ``event_id`` that replay run ``run_id`` delivers (deterministic)."""
    return str(uuid.uuid5(_REPLAY_NAMESPACE, f"{run_id}/{event_id}"))


def replay(
    settings: Settings,
    flt: ReplayFilter,
    *,
    again: bool = False,
    dry_run: bool = False,
    per_second: float | None = None,
    actor: str | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
    operation: str = "replay",
) -> OperationResult:
    """Deliver the past events ``flt`` selects again, each as a copy recorded with ``replay_of``.

    The same filter is the same run: started again after an interruption it goes on, and
    sends no copy twice. Once a run finished, the same filter sends nothing; ``again=True``
    starts a new run, which delivers every event once more.

    Raises:
        EventBusError: ``flt.handler`` is not subscribed here, or a bad filter.
        redis.RedisError, sqlalchemy.exc.SQLAlchemyError: as :func:`redrive`.
    """
    stop = stop or threading.Event()
    progress = progress or _NoProgress()
    ctx = _Context(settings, registry)
    only: Subscription | None = None
    if flt.handler is not None:
        only = ctx.registry.get(flt.handler)
        if only is None:
            ctx.close()
            known = ", ".join(s.name for s in ctx.registry) or "none"
            raise EventBusError(f"no handler {flt.handler!r} is subscribed in EVENT_HANDLER_MODULES (known: {known})")
    key = _replay_key(flt)
    with ctx.engine.connect() as conn:
        runs = 0
        if again:
            runs = int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(operations_audit).where(
                        operations_audit.c.run_id.like(f"{key}:%"), operations_audit.c.outcome == "finished",
                        operations_audit.c.dry_run.is_(False),
                    )
                ).scalar_one()
            )  # fmt: skip
    result = OperationResult(operation, f"{key}:{runs}", dry_run)
    script = ctx.client.register_script(_REPLAY_LUA)
    pacer = _Pacer(per_second, stop)
    try:
        with ctx.engine.connect() as conn:
            types = ctx.event_types(conn, flt.pattern if only is None else flt.pattern or "#", every=only is not None)
            if only is not None and types is not None:  # only what the handler subscribes to
                types = [t for t in types if only in ctx.registry.match(t)]
            where, params = _replay_where(flt, types)
            result.selected = int(
                conn.execute(sa.text(f"SELECT count(*) FROM events_log e WHERE {where}"), params).scalar_one()
            )
        progress.start(result.selected)
        done = 0
        for row in _replay_rows(ctx, where, params):
            if not pacer.wait():
                break
            done += 1
            _replay_one(ctx, script, row, only, result)
            progress.advance(done, result.sent)
        result.interrupted = stop.is_set() and done < result.selected
    finally:
        ctx.finish(progress, _actor(actor), result, flt)
    return result


def _replay_where(flt: ReplayFilter, types: list[str] | None) -> tuple[str, dict[str, Any]]:
    conditions = (
        ("e.occurred_at >=", "since", flt.since),
        ("e.occurred_at <", "until", flt.until),
        ("e.user_id =", "user_id", flt.user_id),
    )
    # Originals only: a replay never replays the copies an earlier one made.
    return _where("e.replay_of IS NULL", {}, conditions, types)


def _replay_rows(ctx: _Context, where: str, params: dict[str, Any]) -> Iterator[Any]:
    after: tuple[datetime, int] | None = None
    while True:
        keyset = "" if after is None else " AND (e.occurred_at, e.id) > (:after_at, :after_id)"
        extra = {} if after is None else {"after_at": after[0], "after_id": after[1]}
        with ctx.engine.connect() as conn:
            rows = list(
                conn.execute(
                    sa.text(
                        "SELECT e.id AS row_id, e.event_id::text AS event_id, e.event_type, e.user_id, e.user_id_json,"
                        " e.data, e.occurred_at, e.module, e.causation_id::text AS causation_id,"
                        " e.correlation_id::text AS correlation_id, e.hops, e.version"
                        f" FROM events_log e WHERE {where}{keyset} ORDER BY e.occurred_at, e.id LIMIT :limit"
                    ),
                    {**params, **extra, "limit": _BATCH},
                )
            )
        if not rows:
            return
        yield from rows
        after = (rows[-1].occurred_at, rows[-1].row_id)


def _replay_one(ctx: _Context, script: Any, row: Any, only: Subscription | None, result: OperationResult) -> None:
    subs = ctx.registry.match(row.event_type)
    if only is not None:
        subs = tuple(s for s in subs if s.name == only.name)
    if not subs:
        result.skipped += 1
        result.lines.append(f"skip {row.event_type} {row.event_id}: no subscription matches it")
        return
    copy_id = replay_event_id(result.run_id, row.event_id)
    envelope = json.loads(record_envelope(row))
    envelope.update(event_id=copy_id, replay_of=row.event_id, correlation_id=envelope["correlation_id"] or row.event_id)
    if result.dry_run:
        names = ", ".join(s.name for s in subs)
        result.lines.append(f"would replay {row.event_type} {row.event_id} as {copy_id} to {names}")
        return
    envelope_json = json.dumps(envelope, separators=(",", ":"))
    tasks = [
        task_message(
            task_name=s.name,
            task_id=delivery_task_id(copy_id, s.name),
            queue=s.queue,
            envelope_json=envelope_json,
            event_type=row.event_type,
            event_id=copy_id,
        )
        for s in subs
    ]
    record = event_record(envelope_json, [(s.name, s.queue) for s in subs])
    keys = ctx.keys.scoped(row.event_type)  # the copy's scope is the original's
    mark = keys.replayed(copy_id)
    if ctx.sender is None:
        sent = script(
            keys=[mark, keys.log_buffer, *(keys.celery_queue(s.queue) for s in subs)],
            args=[_REPLAY_MARK_TTL_S, record, *(t.redis_form() for t in tasks)],
        )
    elif ctx.client.exists(mark):
        sent = 0
    else:
        # RabbitMQ: published and confirmed first, then marked and recorded. A run that dies in
        # between sends the copy again on its next run, with the same task ids: done markers
        # run it once.
        ctx.sender.send(tasks)
        sent = script(keys=[mark, keys.log_buffer], args=[_REPLAY_MARK_TTL_S, record])
    if int(sent):
        result.sent += 1
    else:
        result.skipped += 1
        result.lines.append(f"skip {row.event_type} {row.event_id}: this run sent its copy {copy_id} already")


def backfill(
    settings: Settings,
    handler: str,
    *,
    pattern: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    **options: Any,
) -> OperationResult:
    """Feed a (new) handler the past events it subscribes to: a replay to ``handler`` only.

    ``pattern`` defaults to every event; only those the handler's subscription matches are
    sent. Options as :func:`replay`.
    """
    flt = ReplayFilter(pattern=pattern or "#", since=since, until=until, handler=handler)
    return replay(settings, flt, operation="backfill", **options)
