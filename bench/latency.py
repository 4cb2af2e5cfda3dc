"""Latency from publish to handler start, against apply_async to task start, on the same workers.

Both sides take turns in ``WINDOWS`` alternating windows each (ours, baseline, ours, ...), of
equal length, ``duration_s`` a side in all, so a noisy stretch of the machine lands on both
sides instead of on whichever ran then:

- p50 is taken over every sample of a side;
- p99 is taken per window: the row quotes the median of the windows' p99s a side and, as its
  ratio, the median of the per-window ratios (ours / the baseline's window next to it); the
  worst window (the highest ratio) has a row of its own and is in the note, with every ratio.

It also breaks our latency down into stages, from times that exist anyway or that cost a
line written to a file, never a Redis command (see :func:`stage_rows`): publish → XADD →
router read → LPUSH → worker receive → handler start, the last split at ``task_prerun``; the
baseline's counterparts where it has them (apply_async → LPUSH → worker receive → task start).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals

from bench.harness import Result, median_pairs, result
from bench.stack import LATENCY_KEY, STAGES_DIR, paced, wait_until
from project import bus as bus_module
from project.events import event_bus
from project.redis_conn import send_one

__all__ = ["WINDOWS", "bench_latency", "percentile", "stage_rows"]

# Alternating windows a side (at least 5, as the performance issue asks).
WINDOWS = 5
P50_TARGET = 1.3
P99_TARGET = 2.0
PROBE_TASK = "bench.tasks.probe"

# (label, from, to): the stages, as differences between the times noted for each probe.
# The baseline has no XADD and no router ("read"): stages that need them are ours alone.
STAGES = (
    ("publish → XADD", "publish", "xadd"),
    ("XADD → router read", "xadd", "read"),
    ("router read → LPUSH", "read", "lpush"),
    ("publish → LPUSH", "publish", "lpush"),
    ("LPUSH → worker receive", "lpush", "receive"),
    ("worker receive → handler start", "receive", "start"),
    ("worker receive → task_prerun", "receive", "prerun"),
    ("task_prerun → handler start", "prerun", "start"),
)


@dataclass(frozen=True)
class Probe:
    """One latency sample, as the probe handler or task recorded it."""

    latency_s: float  # from publish (or apply_async) to handler (or task) start
    started: float  # the start, seconds since the epoch
    key: str  # the event_id (ours) or the task id (the baseline)
    task_id: str

    @classmethod
    def parse(cls, raw: Any) -> Probe:
        latency, started, key, task_id = (raw.decode() if isinstance(raw, bytes) else str(raw)).split()
        return cls(float(latency), float(started), key, task_id)


def bench_latency(client: redis.Redis, duration_s: float, rate_per_s: float) -> list[Result]:
    """p50, p99 and the stages over ``duration_s`` a side at ``rate_per_s``, on a running stack
    (``bench.stack.end_to_end``)."""
    from bench.tasks import probe

    window_s = duration_s / WINDOWS
    round_trips: dict[str, tuple[float, float]] = {}  # event_id -> its EVALSHA sent, answered (its XADD)
    kombu_publish: dict[str, list[float]] = {}  # task id -> [before, after] kombu's publish (its LPUSH)
    evalsha = _timed_send_one()

    def ours() -> None:
        before = evalsha[0] = evalsha[1] = time.time()
        event_id = event_bus.publish_sync("bench.latency.probe")
        after = time.time()
        # The publish script's own round trip if it went through the wrapper, else the whole call.
        round_trips[event_id] = (evalsha[0], evalsha[1]) if evalsha[1] > before else (before, after)

    def baseline() -> None:
        probe.apply_async(args=[time.time()], queue="bench")

    def window(send: Callable[[], object]) -> list[Probe]:
        client.delete(LATENCY_KEY)
        sent = paced(rate_per_s, window_s, send)
        wait_until(lambda: client.llen(LATENCY_KEY) >= sent, 60)
        return [Probe.parse(v) for v in client.lrange(LATENCY_KEY, 0, -1)]  # type: ignore[union-attr]

    windows: list[tuple[list[Probe], list[Probe]]] = []
    try:
        with _publish_times(kombu_publish):
            for _ in range(WINDOWS):
                windows.append((window(ours), window(baseline)))
    finally:
        setattr(bus_module, "send_one", send_one)  # noqa: B010  (the bus's own again)
    client.delete(LATENCY_KEY)

    ours_all = [p.latency_s for o, _ in windows for p in o]
    base_all = [p.latency_s for _, b in windows for p in b]
    where = f"{rate_per_s:.0f}/s for {duration_s:g} s a side in {WINDOWS} alternating windows of {window_s:g} s"
    results = [
        result("latency p50", percentile(ours_all, 0.5) * 1000, percentile(base_all, 0.5) * 1000, P50_TARGET, "ms",
               lower_is_better=True, note=f"{where}; p50 over every sample of a side")
    ]  # fmt: skip
    p99s = [(percentile([p.latency_s for p in o], 0.99) * 1000, percentile([p.latency_s for p in b], 0.99) * 1000)
            for o, b in windows]  # fmt: skip
    ours99, base99, ratio99 = median_pairs(p99s)
    ratios = [o / b for o, b in p99s]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    worst_text = f"worst window {worst + 1}: {ratios[worst]:.2f} ({p99s[worst][0]:.1f} vs {p99s[worst][1]:.1f} ms)"
    results.append(
        result("latency p99", ours99, base99, P99_TARGET, "ms", lower_is_better=True, ratio=ratio99,
               note=f"{where}; ratio: median of the {WINDOWS} windows' p99 ratios, ours and baseline: median of "
                    f"the windows' p99s; per window {', '.join(f'{r:.2f}' for r in ratios)}; {worst_text}")
    )  # fmt: skip
    results.append(
        result("latency p99, worst window", *p99s[worst], None, "ms", lower_is_better=True,
               note=f"window {worst + 1} of {WINDOWS}, the highest p99 ratio of the windows")
    )  # fmt: skip
    results += stage_rows(client, [p for o, _ in windows for p in o], [p for _, b in windows for p in b],
                          round_trips, kombu_publish)  # fmt: skip
    return results


def stage_rows(
    client: redis.Redis,
    ours: list[Probe],
    baseline: list[Probe],
    round_trips: dict[str, tuple[float, float]],
    kombu_publish: dict[str, list[float]],
) -> list[Result]:
    """p50 and p99 of every stage of ours (and of the baseline's counterpart), in ms, for reference.

    The times, all from the one clock of this machine (seconds since the epoch):

    - publish: the envelope's ``timestamp``, made when the event is built (baseline: just
      before ``apply_async``); the probe handler reports it, as latency and start;
    - XADD: the stream entry id, read back from the event_id's dedup key. It has 1 ms
      resolution, so it is narrowed down by the round trip of the publish script (timed
      around the bus's ``send_one`` in the bench process) and by the router's read, and the middle of
      what is left is taken: off by at most half of that, usually ±0.1 ms;
    - router read: when the router's ``dispatch`` was handed the batch (``XREADGROUP``
      returned), and LPUSH: the middle of the dispatch script call, as
      :mod:`bench.router_probe` notes them (baseline LPUSH: the middle of kombu's publish,
      between Celery's ``before_task_publish`` and ``after_task_publish``);
    - worker receive: Celery's ``task_received`` in the worker's main process, task_prerun
      in the pool process (before ``before_start``, where our lease script runs), as
      :mod:`bench.tasks` notes them for the probes; handler start: the probe's own start.

    Each stage's percentiles are its own: the p99s of the stages do not add up to the p99.
    A stage the estimates make negative (an XADD or LPUSH time off by its error, for a stage
    shorter than that error) counts as 0: no stage takes less.
    """
    entries = _entry_ids(client, [p.key for p in ours])
    calls = _router_calls()
    firsts = [c[0] for c in calls]
    stamps = _worker_stamps()
    values: dict[str, dict[str, list[float]]] = {"ours": defaultdict(list), "baseline": defaultdict(list)}

    def add(side: str, times: dict[str, float]) -> None:
        for label, start, end in STAGES:
            if start in times and end in times:
                values[side][label].append(max(0.0, (times[end] - times[start]) * 1000))

    for p in ours:
        times = {"publish": p.started - p.latency_s, "start": p.started, **stamps.get(p.task_id, {})}
        entry = entries.get(p.key)
        if entry is not None:
            i = bisect.bisect_right(firsts, entry) - 1
            if i >= 0 and entry <= calls[i][1]:
                times["read"], times["lpush"] = calls[i][2], (calls[i][3] + calls[i][4]) / 2
            # Within its millisecond, within the script's round trip, and before the router read it.
            ms = entry[0] / 1000
            sent, answered = round_trips.get(p.key, (times["publish"], math.inf))
            low, high = max(sent, ms), min(answered, ms + 0.001, times.get("read", math.inf))
            times["xadd"] = (low + high) / 2 if high >= low else ms + 0.0005
        add("ours", times)
    for p in baseline:
        times = {"publish": p.started - p.latency_s, "start": p.started, **stamps.get(p.task_id, {})}
        if p.task_id in kombu_publish:
            times["lpush"] = sum(kombu_publish[p.task_id]) / 2
        add("baseline", times)

    rows = []
    for label, _, _ in STAGES:
        o, b = values["ours"][label], values["baseline"][label]
        if not o:
            continue  # not noted (a router without the methods bench.router_probe wraps)
        note = f"{len(o)} of {len(ours)} probes" + (f"; baseline {len(b)} of {len(baseline)}" if b else "")
        for q in (0.5, 0.99):
            rows.append(result(f"latency stage p{round(q * 100)}: {label}", percentile(o, q),
                               percentile(b, q) if b else None, None, "ms", note=note))  # fmt: skip
    if rows:
        rows[0].note += (
            "; times from existing stamps and file lines, no Redis command: XADD from the entry id (1 ms "
            "resolution, narrowed by the publish script's round trip and the router's read), LPUSH the middle "
            "of the dispatch script call (baseline: of kombu's publish); each stage's percentile on its own "
            "(see bench.latency.stage_rows)"
        )
    return rows


def _timed_send_one() -> list[float]:
    """Wrap the bus's ``send_one`` (the publish script's round trip; the caller puts it back) to
    note when each call was sent and answered, in the list returned."""
    times = [0.0, 0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        times[0] = time.time()
        reply = send_one(*args, **kwargs)
        times[1] = time.time()
        return reply

    setattr(bus_module, "send_one", timed)  # noqa: B010  (mypy: the bus does not export send_one)
    return times


@contextmanager
def _publish_times(into: dict[str, list[float]]) -> Iterator[None]:
    """Note when kombu's publish (its LPUSH) of each baseline probe begins and ends, by task id."""

    def before(sender: Any = None, headers: Any = None, **_: Any) -> None:
        at = time.time()
        if sender == PROBE_TASK and headers:
            into[headers["id"]] = [at, at]

    def after(sender: Any = None, headers: Any = None, **_: Any) -> None:
        at = time.time()
        if sender == PROBE_TASK and headers and headers["id"] in into:
            into[headers["id"]][1] = at

    signals.before_task_publish.connect(before, weak=False, dispatch_uid="bench.latency.before")
    signals.after_task_publish.connect(after, weak=False, dispatch_uid="bench.latency.after")
    try:
        yield
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="bench.latency.before")
        signals.after_task_publish.disconnect(dispatch_uid="bench.latency.after")


def _entry_id(raw: Any) -> tuple[int, int]:
    ms, seq = (raw.decode() if isinstance(raw, bytes) else str(raw)).split("-")
    return int(ms), int(seq)


def _entry_ids(client: redis.Redis, event_ids: list[str]) -> dict[str, tuple[int, int]]:
    """The stream entry id each event was stored as (its dedup key holds it), as (ms, seq)."""
    keys = event_bus.keys
    found: dict[str, tuple[int, int]] = {}
    for i in range(0, len(event_ids), 1000):
        chunk = event_ids[i : i + 1000]
        values: Any = client.mget([keys.published(e) for e in chunk])
        found.update((e, _entry_id(v)) for e, v in zip(chunk, values, strict=True) if v)
    return found


def _router_calls() -> list[tuple[tuple[int, int], tuple[int, int], float, float, float]]:
    """Every dispatch script call the router noted: (first id, last id, read, sent, returned), by first id."""
    calls = []
    for path in STAGES_DIR.glob("router-*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                read, sent, back, first, last = parts
                calls.append((_entry_id(first), _entry_id(last), float(read), float(sent), float(back)))
    return sorted(calls)


def _worker_stamps() -> dict[str, dict[str, float]]:
    """By task id: when the worker received it ("receive") and a pool process began it ("prerun")."""
    names = {"r": "receive", "p": "prerun"}
    stamps: dict[str, dict[str, float]] = defaultdict(dict)
    for path in STAGES_DIR.glob("worker-*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] in names:
                stamps[parts[1]].setdefault(names[parts[0]], float(parts[2]))
    return stamps


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
