"""The verdict every fault scenario ends with.

Given what the scenario published (``stack.published``) and what it did (kills, injected
entries, deliveries it expects to end dead), :func:`check` waits with a deadline for the
record to settle and then checks, all at once:

- every event whose publish returned is in ``events_log``, once; no event nobody published
  is there (except the ``module.error`` reports of deliveries expected to die);
- every (event, matching handler) has a row in ``event_deliveries`` with its final status
  (``succeeded`` unless the scenario expects ``dead`` or ``rejected``), none is left
  ``dispatched``, ``started`` or ``retrying``, and no other delivery exists;
- exactly-once handlers (``event.redis_transaction()``, ``event.transaction()``) had their
  effect exactly once (none for a dead delivery); plain handlers ran at least once, and the
  repeats across all of them fit the scenario's budget (one per kill it made);
- the dead-letter stream holds only entries the scenario injected; nothing was set aside
  by the log writer (``log-rejected``), shed, or left in ``rejected-tasks`` unexpectedly;
- every process that should be running still is.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from project.keys import LOG_GROUP, ROUTER_GROUP
from tests.faults import routes
from tests.faults.harness import Stack, wait_for

__all__ = ["Expect", "Verdict", "check", "module_errors", "wait_idle"]

FINAL = ("succeeded", "dead", "rejected")


@dataclass(frozen=True)
class Expect:
    """What one delivery must end as; ``runs``/``attempts`` None: not checked exactly."""

    status: str = "succeeded"
    runs: int | None = None
    attempts: int | None = None


@dataclass
class Verdict:
    """What the checker found; :meth:`line` is the one-line summary."""

    events: int = 0
    deliveries: int = 0
    lost: int = 0
    run_twice: int = 0
    kills: int = 0
    dead: int = 0
    rejected: int = 0
    lost_events: list[str] = field(default_factory=list)
    # What ``lost`` is made of: events not on record, deliveries without a row, deliveries
    # never final, deliveries final without their run or effect.
    lost_kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"events={self.events} deliveries={self.deliveries} lost={self.lost} "
            f"run_twice={self.run_twice} kills={self.kills}"
        )


@dataclass
class _Snapshot:
    logged: dict[str, tuple[str, dict[str, Any]]]
    deliveries: dict[tuple[str, str], tuple[str, int, str | None]]
    idle: bool
    idle_reason: str
    task_ids: dict[tuple[str, str], str]


def check(
    stack: Stack,
    *,
    kills: int = 0,
    repeats_budget: float | None = None,
    expect: Mapping[tuple[str, str], Expect] | None = None,
    dead_letters: Collection[str] = (),
    rejected_tasks: int = 0,
    modules: tuple[str, ...] = (routes.APP,),
    allow_lost: bool = False,
    timeout_s: float = 90.0,
) -> Verdict:
    """Wait for the record to settle, then check everything; raise AssertionError on any problem.

    ``repeats_budget`` (default ``kills``) is how many extra runs of plain handlers the
    scenario's faults can explain. ``expect`` overrides the outcome of single deliveries,
    keyed by (event_id, handler short name). ``dead_letters`` are the stream entry ids the
    scenario put in that may be dead-lettered. With ``allow_lost`` (a Redis that loses
    acknowledged writes), published events missing from the record are counted, not failed.
    """
    expect = dict(expect or {})
    budget = kills if repeats_budget is None else repeats_budget
    published = dict(stack.published)
    snap = _settle(stack, published, modules, allow_lost, timeout_s)
    verdict = _judge(stack, snap, published, expect, budget, dead_letters, rejected_tasks, modules, allow_lost)
    verdict.kills = kills
    print(f"checker[{stack.prefix}]: {verdict.line()}")
    if verdict.problems:
        raise AssertionError(
            f"{len(verdict.problems)} problem(s); {verdict.line()}\n" + "\n".join(verdict.problems[:40])
        )
    return verdict


def _expected_pairs(
    logged: Mapping[str, tuple[str, dict[str, Any]]], published: Mapping[str, str], modules: tuple[str, ...]
) -> dict[tuple[str, str], routes.Route]:
    pairs: dict[tuple[str, str], routes.Route] = {}
    types = {**{eid: t for eid, (t, _) in logged.items()}, **published}
    for eid, event_type in types.items():
        for route in routes.matching(event_type, modules):
            pairs[(eid, route.short)] = route
    return pairs


def _snapshot(stack: Stack) -> _Snapshot:
    logged = {
        r.event_id: (r.event_type, r.data)
        for r in stack.query("SELECT event_id::text, event_type, data FROM events_log")
    }
    deliveries = {}
    task_ids = {}
    for r in stack.query(
        "SELECT event_id::text, handler, status, attempts, error, task_id::text FROM event_deliveries"
    ):
        short = r.handler.rsplit(".", 1)[-1]
        deliveries[(r.event_id, short)] = (r.status, r.attempts, r.error)
        task_ids[(r.event_id, short)] = r.task_id
    idle, reason = _idle(stack)
    return _Snapshot(logged, deliveries, idle, reason, task_ids)


def _group_idle(client: redis.Redis, stream: str, group: str) -> tuple[bool, str]:
    if not client.exists(stream):
        return True, ""
    groups = {
        (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g for g in client.xinfo_groups(stream)
    }
    info = groups.get(group)
    if info is None:
        return client.xlen(stream) == 0, f"{stream}: no group {group!r} yet"
    if info["pending"]:
        return False, f"{stream}: {info['pending']} pending in {group!r}"
    lag = info.get("lag")
    if lag is None:
        last = client.xinfo_stream(stream)["last-generated-id"]
        return info["last-delivered-id"] == last, f"{stream}: {group!r} not at the end"
    return lag == 0, f"{stream}: {group!r} lags {lag}"


def _idle(stack: Stack) -> tuple[bool, str]:
    keys = stack.keys
    for stream, group in ((keys.stream, ROUTER_GROUP), (keys.log_buffer, LOG_GROUP)):
        ok, why = _group_idle(stack.redis, stream, group)
        if not ok:
            return False, why
    return True, ""


def _unsettled(snap: _Snapshot, published: Mapping[str, str], modules: tuple[str, ...], allow_lost: bool) -> list[str]:
    waiting: list[str] = []
    if not snap.idle:
        waiting.append(snap.idle_reason)
    if not allow_lost:
        missing = [eid for eid in published if eid not in snap.logged]
        if missing:
            waiting.append(f"{len(missing)} published events not in events_log (e.g. {missing[:3]})")
    pending = {pair: row for pair, row in snap.deliveries.items() if row[0] not in FINAL}
    if pending:
        sample = "; ".join(f"{p} {s} attempts={a} error={e!r:.150}" for p, (s, a, e) in list(pending.items())[:3])
        waiting.append(f"deliveries not final: {dict(Counter(r[0] for r in pending.values()))} (e.g. {sample})")
    expected = _expected_pairs(snap.logged, {e: t for e, t in published.items() if e in snap.logged}, modules)
    absent = [pair for pair in expected if pair not in snap.deliveries]
    if absent:
        waiting.append(f"{len(absent)} expected deliveries without a row (e.g. {absent[:3]})")
    return waiting


def _settle(
    stack: Stack, published: Mapping[str, str], modules: tuple[str, ...], allow_lost: bool, timeout_s: float
) -> _Snapshot:
    deadline = time.monotonic() + timeout_s
    # With losses allowed nothing says when a missing event or delivery would still show
    # up: wait until the record stops changing for longer than the reconciler needs.
    env = stack.env
    quiet_s = max(3.0, float(env.get("RECONCILE_AFTER_S", 0)) + 2 * float(env.get("RECONCILE_INTERVAL_S", 1)))
    stable_since: float | None = None
    last: object = None
    while True:
        snap = _snapshot(stack)
        if allow_lost:
            waiting = [] if snap.idle else [snap.idle_reason]
            signature = (len(snap.logged), tuple(sorted(Counter(s for s, _, _ in snap.deliveries.values()).items())))
            if waiting or signature != last:
                stable_since, last = time.monotonic(), signature
                waiting = waiting or ["the record to stop changing"]
            elif time.monotonic() - (stable_since or 0) >= quiet_s:
                return snap
            else:
                waiting = ["the record to stay quiet"]
        else:
            waiting = _unsettled(snap, published, modules, allow_lost)
            if not waiting:
                return snap
            if snap.idle:
                _fail_if_set_aside(stack, [eid for eid in published if eid not in snap.logged])
        if time.monotonic() > deadline:
            dead = stack.dead_processes()
            stack.dump_worker_stacks()
            raise AssertionError(
                f"the record did not settle within {timeout_s}s: "
                + "; ".join(waiting)
                + _redis_side(stack, snap)
                + ("\n" + "\n".join(dead) if dead else "")
            )
        time.sleep(0.25)


def _fail_if_set_aside(stack: Stack, missing: list[str]) -> None:
    """Fail at once if an event whose publish returned was dead-lettered or refused by the log:
    it will never be on record, so waiting for it is pointless."""
    if not missing:
        return
    wanted = {eid.encode() for eid in missing}
    for stream, what in (
        (stack.keys.dead_letter, "dead-lettered by the router"),
        (stack.keys.log_rejected, "set aside by the log writer"),
    ):
        for entry_id, fields in stack.redis.xrange(stream):
            blob = b" ".join(fields.values())
            hit = next((eid for eid in wanted if eid in blob), None)
            if hit is not None:
                raise AssertionError(
                    f"published event {hit.decode()} was {what} ({stream} {entry_id!r}): "
                    f"{fields.get(b'reason', b'')!r:.300}; raw {blob!r:.600}"
                )


def _redis_side(stack: Stack, snap: _Snapshot) -> str:
    """What Redis knows of (a few of) the deliveries that are not final, for the failure message."""
    lines = []
    for pair, (status, _, _) in snap.deliveries.items():
        if status in FINAL or len(lines) >= 3:
            continue
        task_id = snap.task_ids.get(pair)
        if task_id:
            state = stack.redis.hgetall(stack.keys.delivery(task_id))
            gate, lease = stack.redis.get(stack.keys.lease(task_id)), stack.redis.pttl(stack.keys.lease(task_id))
            lines.append(
                f"  {pair} task {task_id}: {stack.keys.delivery(task_id)} = {state!r}, lease {gate!r} pttl {lease}"
            )
    return ("\nin Redis:\n" + "\n".join(lines)) if lines else ""


def wait_idle(stack: Stack, timeout_s: float = 60.0) -> None:
    """Wait until the routers and log writers have read and acknowledged everything."""
    last = [""]

    def idle() -> bool:
        ok, last[0] = _idle(stack)
        return ok

    try:
        wait_for(idle, timeout_s=timeout_s, interval_s=0.1, what="routers and log writers to catch up")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0]}") from None


def _judge(
    stack: Stack,
    snap: _Snapshot,
    published: Mapping[str, str],
    expect: Mapping[tuple[str, str], Expect],
    budget: float,
    dead_letters: Collection[str],
    rejected_tasks: int,
    modules: tuple[str, ...],
    allow_lost: bool,
) -> Verdict:
    v = Verdict()
    problems = v.problems
    client = stack.redis

    # Events.
    rows = stack.query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events_log")[0]
    if rows.n != rows.d:
        problems.append(f"events_log holds {rows.n} rows for {rows.d} event ids")
    v.lost_events = [eid for eid in published if eid not in snap.logged]
    if v.lost_events and not allow_lost:
        problems.append(f"{len(v.lost_events)} published events missing from events_log: {v.lost_events[:5]}")
    v.events = len(published) - len(v.lost_events)

    # Events nobody published: only module.error reports of deliveries expected dead.
    expected_dead = {pair for pair, e in expect.items() if e.status == "dead"}
    reports: Counter[tuple[str, str]] = Counter()
    for eid, (event_type, data) in snap.logged.items():
        if eid in published:
            continue
        if event_type != "module.error":
            problems.append(f"event {eid} ({event_type}) is on record but nobody published it")
            continue
        handler = str(data.get("handler", ""))
        reports[(str(data.get("event_id")), handler.rsplit(".", 1)[-1])] += 1
    for pair, n in reports.items():
        if pair not in expected_dead:
            problems.append(f"unexpected module.error about {pair}")
        elif n != 1:
            problems.append(f"{n} module.error reports about {pair}, expected 1")
    for pair in expected_dead:
        if pair[0] in published and not reports.get(pair):
            problems.append(f"no module.error for the dead delivery {pair}")

    # Deliveries.
    surviving = {e: t for e, t in published.items() if e in snap.logged}
    expected = _expected_pairs(snap.logged, surviving, modules)
    for pair in snap.deliveries:
        if pair not in expected:
            problems.append(f"delivery {pair} (status {snap.deliveries[pair][0]}) matches no subscription")
    runs = stack.runs()
    effects = {k.decode(): int(n) for k, n in client.hgetall(stack.test_key("effects")).items()}
    sql_effects = {
        r.event_id: r.n
        for r in stack.query("SELECT event_id::text, count(*) AS n FROM fault_effects GROUP BY event_id")
    }
    lost_deliveries = 0
    for pair, route in sorted(expected.items()):
        eid, short = pair
        want = expect.get(pair, Expect())
        row = snap.deliveries.get(pair)
        if row is None:
            lost_deliveries += 1
            v.lost_kinds["delivery without a row"] += 1
            if not allow_lost:
                problems.append(f"delivery {pair} has no row in event_deliveries")
            continue
        status, attempts, error = row
        v.deliveries += 1
        v.dead += status == "dead"
        v.rejected += status == "rejected"
        if status not in FINAL and allow_lost:
            lost_deliveries += 1
            v.lost_kinds[f"delivery left {status}"] += 1
        elif status != want.status:
            problems.append(
                f"delivery {pair} is {status!r} (attempts {attempts}, error {error!r:.200}), expected {want.status!r}"
            )
        if want.attempts is not None and attempts != want.attempts:
            problems.append(f"delivery {pair} took {attempts} attempts, expected {want.attempts}")
        n_runs = runs.get(f"{eid}:{short}", 0)
        if want.runs is not None and n_runs != want.runs:
            problems.append(f"delivery {pair} ran {n_runs} times, expected {want.runs}")
        if status == "succeeded" and n_runs == 0 and not allow_lost:  # counters live in the Redis that lost data
            problems.append(f"delivery {pair} is 'succeeded' but its handler never ran")
            lost_deliveries += 1
            v.lost_kinds["succeeded without a run"] += 1
        if not allow_lost and attempts is not None and n_runs > attempts:
            problems.append(f"delivery {pair} ran {n_runs} times but {attempts} attempts are on record")
        if route.kind == "plain":
            v.run_twice += max(0, n_runs - (want.runs if want.runs is not None else 1))
        elif status in FINAL:
            n_effects = effects.get(f"{eid}:{short}", 0) if route.kind == "redis" else sql_effects.get(eid, 0)
            wanted = 1 if status == "succeeded" else 0
            if n_effects > wanted or (n_effects < wanted and not (allow_lost and route.kind == "redis")):
                problems.append(f"delivery {pair} ({status}) had its effect {n_effects} times, expected {wanted}")
            if n_effects > wanted:
                v.run_twice += n_effects - wanted
            elif n_effects < wanted:
                lost_deliveries += 1
                v.lost_kinds["succeeded without its effect"] += 1
        if status == "succeeded" and (attempts or 0) < 1:
            problems.append(f"delivery {pair} succeeded with attempts={attempts}")
    v.lost = len(v.lost_events) + lost_deliveries
    if v.lost_events:
        v.lost_kinds["event not on record"] = len(v.lost_events)
    if v.run_twice > budget:
        problems.append(f"handlers ran {v.run_twice} extra times; the scenario's faults explain {budget}")

    # Side streams.
    allowed = set(dead_letters)
    for entry_id, fields in client.xrange(stack.keys.dead_letter):
        source = fields.get(b"id", b"").decode()
        if source not in allowed:
            problems.append(
                f"dead-letter {entry_id!r} holds {source!r}, which the scenario did not inject: {fields!r:.300}"
            )
    for entry_id, fields in client.xrange(stack.keys.log_rejected, count=5):
        problems.append(f"the log writer set aside {entry_id!r}: {fields!r:.300}")
    shed = client.hgetall(stack.keys.log_shed)
    if shed:
        problems.append(f"log records were shed: {shed!r}")
    if client.exists(stack.keys.rejected_tasks):
        n_rejected = int(client.xlen(stack.keys.rejected_tasks))
        if n_rejected > rejected_tasks:
            sample = client.xrange(stack.keys.rejected_tasks, count=2)
            problems.append(f"{n_rejected} tasks in rejected-tasks, expected {rejected_tasks}: {sample!r:.300}")
    problems.extend(stack.dead_processes())
    return v


def module_errors(stack: Stack) -> list[dict[str, Any]]:
    """The module.error events the suite's handler received."""
    return [json.loads(raw) for raw in stack.redis.lrange(stack.test_key("module-errors"), 0, -1)]
