"""Events on a Redis Cluster: the router's dispatch there against one Redis, how it grows with
routers and with masters, and the Redis commands each master runs per event.

Three private event stores, started for the run and fed the same events: one
``redis-server`` (the baseline), a 3-master cluster and a 1-master cluster
(:mod:`bench.redis_cluster`), all without persistence. Celery's queues are on RabbitMQ for
all three (a vhost made for the run; a cluster needs them there), so the only difference is
where the events live. The events are spread over ``SCOPES`` scopes, two on each master of
the 3-master cluster; each event matches ``MATCHES`` subscriptions.

- Dispatch: ``n`` events are written to the streams as publish leaves them (entry and dedup
  key), then router processes (:mod:`bench.cluster_router`: the project's
  :class:`~project.router.Router` and its ``run``, a thread per scope on a cluster, held at a
  gate until the events are in) drain them. The rate is taken between 10% and 90% of the
  entries acknowledged (polled with ``XINFO GROUPS``), which leaves out the routers' start
  (threads, consumer groups, their RabbitMQ connections) and the last batches' tail. Each
  round runs every configuration once; the medians of the rounds (ratios pair by pair) are
  quoted.
- Commands: ``INFO commandstats`` of every master (``CONFIG RESETSTAT`` first), from
  ``publish_sync`` of each event through one router's dispatch of all of them, divided by the
  events; the polls of this module are left out. On one Redis the same, for the baseline.

On a 2-core machine the routers, the masters, RabbitMQ and this process share two cores:
what grows with routers or masters here is bounded by the CPU, not by Redis.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from bench.amqp import amqp_vhost
from bench.cluster_router import MATCHES, QUEUE, GatedRouters
from bench.commands import commandstats, private_redis
from bench.harness import PREFIX, ROOT, Result, result
from bench.redis_cluster import PrivateRedisCluster, redis_cluster
from project.broker import AmqpSender
from project.bus import EventBus
from project.events import event_bus
from project.keys import ROUTER_GROUP, Keys
from project.settings import Settings

__all__ = ["bench_cluster"]

SCOPES = 6  # two per master of the 3-master cluster
POLL_S = 0.02
TOP = 8  # commands named in a row's note
WARM = 1_200  # events each configuration drains, untimed, before the rounds


@dataclass
class _Store:
    """One place the events live: a Redis or a cluster, its masters, and its router processes."""

    name: str
    url: str
    cluster: bool
    ports: list[int]  # the masters, in slot order
    ranges: list[tuple[int, int]]  # the first and last slot of each master
    routers: GatedRouters

    @property
    def pids(self) -> list[int]:
        """The masters' processes (redis-server names its process after its address)."""
        return [pid for port in self.ports for pid in _pids("redis-server", f"127.0.0.1:{port}")]

    def keys(self, scope: str) -> Keys:
        return Keys(PREFIX, cluster=self.cluster).of_scope(scope)

    def master_of(self, scope: str) -> int:
        """The index in :attr:`ports` of the master holding ``scope``'s stream."""
        return _master_of(self.ranges, self.keys(scope).stream) if self.cluster else 0

    def masters(self) -> list[redis.Redis]:
        return [redis.Redis(port=port) for port in self.ports]


def _master_of(ranges: list[tuple[int, int]], key: str) -> int:
    slot = key_slot(key.encode())
    return next(i for i, (first, last) in enumerate(ranges) if first <= slot <= last)


def _scopes(ranges: list[tuple[int, int]]) -> list[str]:
    """``SCOPES`` scope names, as many on each master of a cluster with these slot ``ranges``."""
    per = SCOPES // len(ranges)
    chosen: dict[int, list[str]] = {m: [] for m in range(len(ranges))}
    i = 0
    while any(len(v) < per for v in chosen.values()):
        scope = f"s{i}"
        master = _master_of(ranges, Keys(PREFIX, cluster=True).of_scope(scope).stream)
        if len(chosen[master]) < per:
            chosen[master].append(scope)
        i += 1
    return sorted(s for v in chosen.values() for s in v)


def _fill(store: _Store, scopes: Sequence[str], n: int) -> None:
    """Write ``n`` events to ``store``'s streams as publish leaves them: the entry and its dedup key."""
    window = event_bus.settings.events_dedup_window_s
    masters = store.masters()
    pipes = [m.pipeline(transaction=False) for m in masters]
    ms = int(time.time() * 1000)
    for i in range(n):
        scope = scopes[i % len(scopes)]
        event_id, encoded = event_bus._encode(f"{scope}.item.made", {"i": i}, None, "bench")
        keys, pipe = store.keys(scope), pipes[store.master_of(scope)]
        entry_id = f"{ms}-{i}"
        pipe.xadd(keys.stream, {"e": encoded}, id=entry_id)
        pipe.set(keys.published(event_id), entry_id, ex=window)
        if i % 1000 == 999:
            for p in pipes:
                p.execute()
    for p, m in zip(pipes, masters, strict=True):
        p.execute()
        m.close()


class _Progress:
    """Entries the routers acknowledged, over every scope's stream; counts its own ``XINFO`` per master."""

    def __init__(self, store: _Store, scopes: Sequence[str]) -> None:
        self.masters = store.masters()
        for m in self.masters:  # connected now: before a count's CONFIG RESETSTAT, not within it
            m.ping()
        streams = {(store.master_of(s), store.keys(s).stream) for s in scopes}
        self.streams = sorted(streams)
        self.own: list[Counter[str]] = [Counter() for _ in self.masters]

    def acked(self) -> int:
        total = 0
        for m, stream in self.streams:
            self.own[m]["xinfo|groups"] += 1
            for group in self.masters[m].xinfo_groups(stream):
                if group["name"] in (ROUTER_GROUP, ROUTER_GROUP.encode()):
                    total += int(group["entries-read"] or 0) - int(group["pending"])
        return total

    def close(self) -> None:
        for m in self.masters:
            m.close()


def _pids(*needles: str) -> list[int]:
    """The processes whose command line holds every one of ``needles``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if all(n in cmdline for n in needles):
                found.append(int(entry.name))
    return found


def _cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user and system) ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _drain(store: _Store, scopes: Sequence[str], routers: int, n: int) -> tuple[float, dict[str, float]]:
    """Let ``routers`` routers drain the ``n`` events filled in.

    Returns events a second from 10% to 90% acknowledged, and the CPU seconds per 1,000 events
    the routers, the masters and RabbitMQ used from ``go`` until the last acknowledgement.
    """
    progress = _Progress(store, scopes)
    who = {"routers": [p.pid for p in store.routers.procs[:routers]], "Redis": store.pids,
           "RabbitMQ": _pids("beam.smp", "rabbit")}  # fmt: skip
    who = {name: pids for name, pids in who.items() if pids}  # a RabbitMQ elsewhere (BENCH_AMQP_URL) is not seen
    try:
        cpu = {name: _cpu_s(pids) for name, pids in who.items()}
        store.routers.go(routers)
        start = time.perf_counter()
        samples = [(start, 0)]
        deadline = start + 60 + n / 100
        while samples[-1][1] < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{store.name}: {samples[-1][1]} of {n} events dispatched")
            time.sleep(POLL_S)
            before = time.perf_counter()
            acked = progress.acked()
            samples.append(((before + time.perf_counter()) / 2, acked))
        cpu = {name: (_cpu_s(who[name]) - used) * 1000 / n for name, used in cpu.items()}
        done = store.routers.halt(routers)
        if sum(done) != n:
            raise RuntimeError(f"{store.name}: the routers acknowledged {done} entries, not {n} in all")
    finally:
        progress.close()
    low, high = _crossing(samples, 0.1 * n), _crossing(samples, 0.9 * n)
    if high - low < 4 * POLL_S:  # too few batches to tell (the harness check's tiny counts)
        return n / (samples[-1][0] - start), cpu
    return 0.8 * n / (high - low), cpu


def _crossing(samples: list[tuple[float, int]], level: float) -> float:
    """When the acknowledged count reached ``level``, between the two samples around it."""
    for (t0, a0), (t1, a1) in itertools.pairwise(samples):
        if a1 >= level:
            return t0 + (t1 - t0) * (level - a0) / (a1 - a0) if a1 > a0 else t1
    return samples[-1][0]


def _flush(store: _Store) -> None:
    for m in store.masters():
        m.flushall()
        m.close()


def _commands(store: _Store, scopes: Sequence[str], amqp_url: str, n: int) -> list[Counter[str]]:
    """Commands each master ran, from ``publish_sync`` of ``n`` events through one router's dispatch."""
    bus = EventBus(Settings(redis_url=store.url, celery_broker_url=amqp_url, events_prefix=PREFIX))
    bus.publish_sync(f"{scopes[0]}.item.made", {"warm": True})  # the client, its slots, the script
    _flush(store)
    progress = _Progress(store, scopes)
    masters = store.masters()
    try:
        for m in masters:
            m.config_resetstat()
        for i in range(n):
            bus.publish_sync(f"{scopes[i % len(scopes)]}.item.made", {"i": i})
        store.routers.go(1)
        deadline = time.monotonic() + 60 + n / 100
        while progress.acked() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{store.name}: the router did not dispatch {n} events")
            time.sleep(POLL_S)
        counts = [commandstats(m) for m in masters]
        store.routers.halt(1)
    finally:
        bus.close()
        progress.close()
        for m in masters:
            m.close()
    for calls, own in zip(counts, progress.own, strict=True):
        calls.subtract(own)
    return [+c for c in counts]


def bench_cluster(n: int, rounds: int, commands_n: int) -> list[Result]:
    """Dispatch on 3 masters vs one Redis, 2 routers vs 1, 3 masters vs 1; commands per event per master."""
    with ExitStack() as stack:
        amqp_url = stack.enter_context(amqp_vhost(f"eventbus-bench-cluster-{uuid.uuid4().hex[:8]}"))
        single_url = stack.enter_context(private_redis())
        three: PrivateRedisCluster = stack.enter_context(redis_cluster(3))
        one: PrivateRedisCluster = stack.enter_context(redis_cluster(1))
        scopes = _scopes(three.slot_ranges())

        def store(name: str, url: str, cluster: bool, ports: list[int], ranges: list[tuple[int, int]],
                  count: int) -> _Store:  # fmt: skip
            env = {"REDIS_URL": url, "REDIS_CLUSTER": str(cluster).lower(), "CELERY_BROKER_URL": amqp_url,
                   "BENCH_CLUSTER_SCOPES": ",".join(scopes), "ROUTER_BLOCK_MS": "100"}  # fmt: skip
            routers = GatedRouters(
                count, env, ROOT, ROOT / "bench" / ".logs" / f"{PREFIX}-cluster-{name.replace(' ', '-')}"
            )
            stack.callback(routers.close)
            return _Store(name, url, cluster, ports, ranges, routers)

        single_port = int(single_url.rsplit(":", 1)[1].split("/")[0])
        single = store("one Redis", single_url, False, [single_port], [(0, 16383)], 1)
        three_masters = store("3 masters", three.url, True, three.ports, three.slot_ranges(), 2)
        one_master = store("1 master", one.url, True, one.ports, one.slot_ranges(), 2)
        for s in (single, three_masters, one_master):
            s.routers.ready()
        sender = AmqpSender(Settings(celery_broker_url=amqp_url, events_prefix=PREFIX))
        stack.callback(sender.close)
        configs = [(single, 1), (three_masters, 1), (three_masters, 2), (one_master, 2)]
        rates: dict[tuple[str, int], list[float]] = {(s.name, k): [] for s, k in configs}
        cpus: dict[tuple[str, int], list[dict[str, float]]] = {(s.name, k): [] for s, k in configs}

        def measure(s: _Store, k: int, count: int) -> tuple[float, dict[str, float]]:
            _flush(s)
            _fill(s, scopes, count)
            measured = _drain(s, scopes, k, count)
            sender.purge(QUEUE)
            return measured

        for s, k in configs:  # warm: imports, scripts, connections, the queue's declaration
            measure(s, k, min(n, WARM))
        for _ in range(rounds):
            for s, k in configs:
                r, cpu = measure(s, k, n)
                rates[s.name, k].append(r)
                cpus[s.name, k].append(cpu)
        cpu_use = {c: {who: statistics.median(x[who] for x in v) for who in v[0]} for c, v in cpus.items()}
        _print_rates(rates, cpu_use)
        stats = {s.name: _commands(s, scopes, amqp_url, commands_n) for s in (single, three_masters)}
        placement = [sum(three_masters.master_of(sc) == m for sc in scopes) for m in range(3)]
    _print_commands(stats, commands_n)
    return _rows(rates, cpu_use, stats, commands_n, placement, n, rounds)


def _rows(rates: dict[tuple[str, int], list[float]], cpu: dict[tuple[str, int], dict[str, float]],
          stats: dict[str, list[Counter[str]]], commands_n: int, placement: list[int], n: int,
          rounds: int) -> list[Result]:  # fmt: skip
    def paired(ours: tuple[str, int], base: tuple[str, int]) -> tuple[float, float, float, str]:
        o, b = rates[ours], rates[base]
        ratios = [x / y for x, y in zip(o, b, strict=True)]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        return statistics.median(o), statistics.median(b), statistics.median(ratios), each

    how = (f"{n:,} events preloaded over {SCOPES} scopes ({MATCHES} subscriptions match each), drained by "
           f"router processes (a thread per scope on a cluster), Celery's queues on RabbitMQ (confirms per "
           f"batch) for all; rate from 10% to 90% acknowledged; median of {rounds} rounds")  # fmt: skip
    rows = []
    for name, ours, base, added in (
        ("cluster: dispatch, 3 masters vs one Redis", ("3 masters", 1), ("one Redis", 1), 0),
        ("cluster: dispatch, 2 routers vs 1 (3 masters)", ("3 masters", 2), ("3 masters", 1), 1),
        ("cluster: dispatch, 3 masters vs 1 master (2 routers)", ("3 masters", 2), ("1 master", 2), 2),
    ):
        o, b, r, each = paired(ours, base)
        what = ("one router each", f"{o - b:+,.0f} events/s for the added router",
                f"{(o - b) / 2:+,.0f} events/s per added master")[added]  # fmt: skip
        used = "; ".join(f"{c[0]}, {_routers(c[1])}: {_cpu_text(cpu[c])}" for c in (ours, base))
        rows.append(result(name, o, b, None, "events/s", ratio=r,
                           note=f"{what}; ratio per round {each}; CPU s per 1,000 events, {used}; {how}"))  # fmt: skip
    base_calls = stats["one Redis"][0]
    per_base = base_calls.total() / commands_n
    masters = stats["3 masters"]
    total = sum(c.total() for c in masters)
    rows.append(result("cluster: Redis commands per event, 3 masters (sum) vs one Redis", total / commands_n,
                       per_base, None, "commands/event", lower_is_better=True,
                       note=f"INFO commandstats of each master, from publish_sync of {commands_n:,} events over "
                            f"{SCOPES} scopes through one router's dispatch (Celery's queues on RabbitMQ); "
                            f"per event, the cluster: {_top(sum(masters, Counter()), commands_n)}; "
                            f"one Redis: {_top(base_calls, commands_n)}"))  # fmt: skip
    for i, calls in enumerate(masters):
        own = placement[i] * commands_n / SCOPES
        rows.append(result(f"cluster: Redis commands per event, master {i + 1} of 3", calls.total() / commands_n,
                           per_base, None, "commands/event", lower_is_better=True,
                           note=f"per event published to the cluster, against one Redis' per event; it holds "
                                f"{placement[i]} of the {SCOPES} scopes: {calls.total() / max(own, 1):.2f} per "
                                f"event of its own; {_top(calls, commands_n)}"))  # fmt: skip
    return rows


def _routers(k: int) -> str:
    return f"{k} router{'s' if k > 1 else ''}"


def _cpu_text(used: dict[str, float]) -> str:
    return ", ".join(f"{who} {s:.2f}" for who, s in used.items())


def _top(calls: Counter[str], events: int) -> str:
    return ", ".join(f"{name} {c / events:.2f}" for name, c in calls.most_common(TOP))


def _print_rates(rates: dict[tuple[str, int], list[float]], cpu: dict[tuple[str, int], dict[str, float]]) -> None:
    print("Router dispatch, events/s per round, and CPU s per 1,000 events (bench.cluster):", file=sys.stderr)
    for (name, k), values in rates.items():
        print(f"  {name}, {_routers(k)}: {', '.join(f'{v:,.0f}' for v in values)}"
              f" ({_cpu_text(cpu[name, k])})", file=sys.stderr)  # fmt: skip


def _print_commands(stats: dict[str, list[Counter[str]]], events: int) -> None:
    print("Redis commands per event, by master (bench.cluster):", file=sys.stderr)
    for name, masters in stats.items():
        for i, calls in enumerate(masters):
            print(f"  {name}, master {i + 1}: {calls.total() / events:.2f} ({_top(calls, events)})", file=sys.stderr)
