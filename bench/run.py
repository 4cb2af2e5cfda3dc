"""``make bench``: every hot path measured against its baseline in the same run.

Each figure is a ratio against a baseline measured in the same process tree, moments
apart, so a noisy machine cancels out; each measurement is repeated and the median quoted.
Prints a table and writes ``bench/results.json``. ``--quick`` runs everything with tiny
counts (seconds): the test suite does that so the harness cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = f"bench{uuid.uuid4().hex[:8]}"
DB_NAME = f"bench_{PREFIX}"
ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")

# Everything below reads the settings once: fix the environment first.
os.environ.update({
    "EVENTS_PREFIX": PREFIX,
    "EVENT_HANDLER_MODULES": "bench.handlers",
    "DATABASE_URL": ADMIN_DSN.rsplit("/", 1)[0] + f"/{DB_NAME}",
})  # fmt: skip

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from project.bus import EventBus  # noqa: E402
from project.celery_app import app  # noqa: E402
from project.delivery import register_tasks  # noqa: E402
from project.eventlog import LogWriter  # noqa: E402
from project.events import event_bus  # noqa: E402
from project.keys import ROUTER_GROUP  # noqa: E402
from project.router import Router, ensure_group  # noqa: E402
from project.settings import get_settings  # noqa: E402
from project.tables import events_log  # noqa: E402


@dataclass
class Result:
    name: str
    ours: float
    baseline: float | None
    ratio: float | None
    target: str
    units: str
    met: bool | None
    machine: dict[str, str]
    note: str = ""


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    client = event_bus.sync_client()
    import celery
    import kombu

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "redis": str(client.info("server")["redis_version"]),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "platform": platform.platform(),
    }


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


def rate(count: int, run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def wipe(client: redis.Redis) -> None:
    for key in client.scan_iter(match=f"{PREFIX}:*", count=1000):
        client.delete(key)


# -- publish ------------------------------------------------------------------------------


def interleaved(
    ours: Callable[[int], float], baseline: Callable[[int], float], n: int, rounds: int
) -> tuple[float, float, float]:
    """Alternate ours and the baseline in short chunks; return both medians and the median ratio.

    Each chunk pair runs within milliseconds of each other, so a burst of noise from a
    neighbour hits both sides of one pair rather than one side of the whole comparison.
    """
    chunk = max(50, n // 10)
    pairs = [(ours(chunk), baseline(chunk)) for _ in range(rounds * max(1, n // chunk))]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))  # fmt: skip


def bench_publish(n: int, rounds: int) -> list[Result]:
    client = event_bus.sync_client()
    data = {"kp_index": 8, "severity": "G4", "user_id": 42}
    payload = event_bus._encode("bench.item.made", data, None, None)[1]  # the same JSON ours sends
    channel = event_bus.keys.channel("bench.item.made")

    def ours(count: int) -> float:
        return rate(count, lambda: [event_bus.publish_sync("bench.item.made", data) for _ in range(count)])

    def baseline(count: int) -> float:
        return rate(count, lambda: [client.publish(channel, payload) for _ in range(count)])

    sync = interleaved(ours, baseline, n, rounds)
    client.delete(event_bus.keys.stream)

    async def async_run() -> tuple[float, float, float]:
        import redis.asyncio as aredis

        bus = EventBus(get_settings())
        aclient = aredis.Redis.from_url(get_settings().redis_url)
        pairs = []
        chunk = max(50, n // 10)
        for _ in range(rounds * max(1, n // chunk)):
            start = time.perf_counter()
            for _ in range(chunk):
                await bus.publish("bench.item.made", data)
            a = chunk / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(chunk):
                await aclient.publish(channel, payload)
            pairs.append((a, chunk / (time.perf_counter() - start)))
        await bus.aclose()
        await aclient.aclose()
        return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                statistics.median(p[0] / p[1] for p in pairs))  # fmt: skip

    asynchronous = asyncio.run(async_run())
    client.delete(event_bus.keys.stream)
    return [
        result("publish (publish_sync)", sync[0], sync[1], 0.7, "events/s", ratio=sync[2],
               note="ratio: median of interleaved chunk pairs"),
        result("publish (await publish)", asynchronous[0], asynchronous[1], 0.7, "events/s", ratio=asynchronous[2],
               note="baseline: redis.asyncio PUBLISH"),
    ]  # fmt: skip


# -- dispatch and matching ------------------------------------------------------------------


def registry_bus(total: int) -> EventBus:
    """A bus with ``total`` subscriptions, three of which match bench.item.made."""
    from bench import handlers

    bus = EventBus(get_settings())
    for handler in (handlers.count_a, handlers.count_b, handlers.count_c):
        bus.subscribe("bench.item.made", handler, queue=handlers.QUEUE)
    for i in range(total - len(bus.registry)):
        bus.subscribe(f"other{i}.thing.done", name=f"bench.filler_{i}", queue="bench")(_noop)
    return bus


def _noop(event: dict[str, Any]) -> None:
    pass


def fill_stream(client: redis.Redis, n: int, event_type: str = "bench.item.made") -> None:
    bus = event_bus
    pipe = client.pipeline(transaction=False)
    script = client.register_script(
        "redis.call('XADD', KEYS[1], '*', 'e', ARGV[1]) return 1"
    )  # the stream as publish leaves it, without n round trips
    for i in range(n):
        _, encoded = bus._encode(event_type, {"i": i}, None, "bench")
        script(keys=[bus.keys.stream], args=[encoded], client=pipe)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def router_rate(bus: EventBus, n: int) -> float:
    client = event_bus.sync_client()
    wipe(client)
    fill_stream(client, n)
    ensure_group(client, bus.keys.stream, ROUTER_GROUP)
    router = Router(get_settings(), bus.registry, consumer="bench")
    start = time.perf_counter()
    while router._read_and_dispatch(">", block_ms=None):
        pass
    elapsed = time.perf_counter() - start
    assert router.stats.entries == n, router.stats
    wipe(client)
    return n / elapsed


def bench_dispatch(n: int, baseline_n: int, rounds: int) -> list[Result]:
    import celery_pubsub

    bus = registry_bus(1000)
    client = event_bus.sync_client()
    register_tasks(app, bus)
    matching = bus.registry.match("bench.item.made")
    tasks = [app.tasks[s.name] for s in matching]
    for task in tasks:
        celery_pubsub.subscribe("bench.item.made", task)
    envelope = json.loads(bus._encode("bench.item.made", {"i": 0}, None, "bench")[1])

    def ours() -> float:
        return router_rate(bus, n) * len(matching)

    def apply_async_loop() -> float:
        def run() -> None:
            for _ in range(baseline_n):
                for task in tasks:
                    task.apply_async(args=[envelope])

        r = rate(baseline_n * len(tasks), run)
        wipe(client)
        return r

    def pubsub() -> float:
        r = rate(
            baseline_n * len(tasks),
            lambda: [celery_pubsub.publish("bench.item.made", envelope) for _ in range(baseline_n)],
        )
        wipe(client)
        return r

    triples = [(ours(), apply_async_loop(), pubsub()) for _ in range(rounds)]
    o = statistics.median(t[0] for t in triples)
    a = statistics.median(t[1] for t in triples)
    p = statistics.median(t[2] for t in triples)
    return [
        result("dispatch vs apply_async", o, a, 2.0, "Celery messages/s",
               note="one router, 3 of 1,000 subscriptions match each event"),
        result("dispatch vs celery-pubsub", o, p, None, "Celery messages/s",
               note="celery_pubsub.publish of the same events to the same 3 tasks"),
    ]  # fmt: skip


def bench_matching(n: int, rounds: int) -> list[Result]:
    big, small = registry_bus(10_000), registry_bus(10)
    pairs = [(router_rate(big, n), router_rate(small, n)) for _ in range(rounds)]
    return [
        result("matching: 10,000 vs 10 subscriptions", statistics.median(p[0] for p in pairs),
               statistics.median(p[1] for p in pairs), 0.8, "events/s (router)")
    ]  # fmt: skip


# -- end to end, with real worker processes -------------------------------------------------


@contextmanager
def processes(*commands: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    logs = ROOT / "bench" / ".logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        out = (logs / f"{PREFIX}-{i}.log").open("wb")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy(), stdout=out, stderr=subprocess.STDOUT))
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def worker_cmd() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "project.celery_app", "worker", "-Q", "bench", "-c", "2",
            "-P", "prefork", "-I", "bench.tasks", "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
            "-n", f"bench-{PREFIX}@%h"]  # fmt: skip


def router_cmd(log_writer: bool = True) -> list[str]:
    return [sys.executable, "-m", "project.cli", "--log-level", "WARNING", "router",
            *([] if log_writer else ["--no-log-writer"])]  # fmt: skip


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.01)


def warm_up(client: redis.Redis, send: Callable[[], object], count: int = 20) -> None:
    key = f"{PREFIX}:bench:done"
    client.delete(key)
    for _ in range(count):
        send()
    wait_until(lambda: int(client.get(key) or 0) >= count, 60)
    client.delete(key)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def paced(rate_per_s: float, duration_s: float, send: Callable[[], object]) -> int:
    interval, start, sent = 1.0 / rate_per_s, time.perf_counter(), 0
    while (now := time.perf_counter() - start) < duration_s:
        if now >= sent * interval:
            send()
            sent += 1
        else:
            time.sleep(min(interval / 4, sent * interval - now))
    return sent


def bench_latency_and_throughput(duration_s: float, rate_per_s: float, n: int) -> list[Result]:
    client = event_bus.sync_client()
    from bench.tasks import count, probe

    key = f"{PREFIX}:bench:latency"
    done = f"{PREFIX}:bench:done"
    results = []
    with processes(worker_cmd(), router_cmd()):
        warm_up(client, lambda: event_bus.publish_sync("bench.one.made"))
        warm_up(client, lambda: count.apply_async(queue="bench"))

        def latencies(send: Callable[[], object], window_s: float) -> list[float]:
            client.delete(key)
            sent = paced(rate_per_s, window_s, send)
            wait_until(lambda: client.llen(key) >= sent, 60)
            return [float(v) for v in client.lrange(key, 0, -1)]  # type: ignore[union-attr]

        # Three alternating windows a side (30 s each in all), so a noisy stretch of the
        # machine lands on both sides instead of on whichever ran then.
        ours: list[float] = []
        base: list[float] = []
        windows = 3
        for _ in range(windows):
            ours += latencies(lambda: event_bus.publish_sync("bench.latency.probe"), duration_s / windows)
            base += latencies(lambda: probe.apply_async(args=[time.time()], queue="bench"), duration_s / windows)
        for q, target in ((0.5, 1.5), (0.99, 2.0)):
            o, b = percentile(ours, q) * 1000, percentile(base, q) * 1000
            note = f"{rate_per_s:.0f}/s for {duration_s:.0f} s in {windows} alternating windows"
            results.append(result(f"latency p{int(q * 100)}", o, b, target, "ms", lower_is_better=True, note=note))

        def drain(send_all: Callable[[], object]) -> float:
            client.delete(done)
            start = time.perf_counter()
            send_all()
            wait_until(lambda: int(client.get(done) or 0) >= n, 300)
            return n / (time.perf_counter() - start)

        pairs = [
            (
                drain(lambda: [event_bus.publish_sync("bench.one.made") for _ in range(n)]),
                drain(lambda: [count.apply_async(queue="bench") for _ in range(n)]),
            )
            for _ in range(3)
        ]
        results.append(result("throughput end to end", statistics.median(p[0] for p in pairs),
                              statistics.median(p[1] for p in pairs), 0.8, "events/s",
                              note="no-op handlers, 2 worker processes, router and log writer alongside"))  # fmt: skip
    return results


# -- log writer and memory -------------------------------------------------------------------


def bench_log_writer(n: int, baseline_n: int, rounds: int) -> list[Result]:
    settings = get_settings()
    engine = sa.create_engine(settings.database_url)
    client = event_bus.sync_client()

    def records(count: int) -> list[str]:
        out = []
        for i in range(count):
            raw = event_bus._encode("bench.item.made", {"i": i}, None, "bench")[1]
            out.append(f'{{"k":"e","at":{time.time()},"d":[],"event":{raw}}}')
        return out

    def ours() -> float:
        wipe(client)
        pipe = client.pipeline(transaction=False)
        for rec in records(n):
            pipe.xadd(event_bus.keys.log_buffer, {"r": rec})
        pipe.execute()
        writer = LogWriter(settings, engine=engine, client=client, consumer="bench")
        ensure_group(client, event_bus.keys.log_buffer, "log-writer")
        start = time.perf_counter()
        while writer.written < n:
            reply: Any = client.xreadgroup("log-writer", "bench", {event_bus.keys.log_buffer: ">"},
                                           count=settings.log_batch_size)  # fmt: skip
            writer.write(reply[0][1])
        return n / (time.perf_counter() - start)

    def baseline() -> float:
        rows = [json.loads(r)["event"] for r in records(baseline_n)]
        start = time.perf_counter()
        for ev in rows:
            with engine.begin() as conn:
                conn.execute(sa.insert(events_log).values(
                    event_id=ev["event_id"], event_type=ev["event_type"], user_id=None, module=ev["module"],
                    data=ev["data"], occurred_at=ev["timestamp"], causation_id=None,
                    correlation_id=ev["correlation_id"], hops=0))  # fmt: skip
        return baseline_n / (time.perf_counter() - start)

    pairs = [(ours(), baseline()) for _ in range(rounds)]
    engine.dispose()
    return [result("log writer", statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                   10.0, "rows/s", note="baseline: one INSERT and commit per row through SQLAlchemy")]  # fmt: skip


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_memory(small: int, large: int) -> list[Result]:
    client = event_bus.sync_client()
    wipe(client)
    queue = event_bus.keys.celery_queue("bench")

    def dispatched(count: int) -> Callable[[], bool]:
        def check() -> bool:
            client.delete(queue)  # keep Redis small: nothing consumes these
            groups: Any = client.xinfo_groups(event_bus.keys.stream)
            return bool(groups) and int(groups[0]["entries-read"] or 0) >= count and not groups[0]["pending"]

        return check

    with processes(router_cmd(log_writer=False)) as (router,):
        fill_stream(client, small, "bench.one.made")
        wait_until(dispatched(small), 120)
        before = rss_kb(router.pid)
        fill_stream(client, large - small, "bench.one.made")
        wait_until(dispatched(large), 600)
        after = rss_kb(router.pid)
    wipe(client)
    growth_mb = (after - before) / 1024
    return [Result(f"memory: router RSS growth {small:,} -> {large:,} events", round(growth_mb, 2), None, None,
                   "under 20 MB", "MB", growth_mb < 20, MACHINE,
                   note=f"RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB")]  # fmt: skip


# -- harness ----------------------------------------------------------------------------------

MACHINE: dict[str, str] = {}


def result(name: str, ours: float, baseline: float, target: float | None, units: str, *,
           lower_is_better: bool = False, note: str = "", ratio: float | None = None) -> Result:  # fmt: skip
    if ratio is None:
        ratio = ours / baseline if baseline else None
    if target is None or ratio is None:
        met, target_text = None, "(reference)"
    elif lower_is_better:
        met, target_text = ratio <= target, f"ratio <= {target}"
    else:
        met, target_text = ratio >= target, f"ratio >= {target}"
    return Result(name, round(ours, 3), round(baseline, 3), None if ratio is None else round(ratio, 3),
                  target_text, units, met, MACHINE, note)  # fmt: skip


def create_database() -> None:
    admin = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{DB_NAME}"'))
    admin.dispose()
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip


def drop_database() -> None:
    admin = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    admin.dispose()


def print_table(results: list[Result]) -> None:
    header = ("benchmark", "ours", "baseline", "ratio", "target", "met", "units")
    rows = [
        (r.name, f"{r.ours:,.2f}", "" if r.baseline is None else f"{r.baseline:,.2f}",
         "" if r.ratio is None else f"{r.ratio:.2f}", r.target, {True: "yes", False: "NO", None: "-"}[r.met], r.units)
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, measures nothing")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--only", help="comma-separated: publish,dispatch,matching,e2e,logwriter,memory")
    args = parser.parse_args(argv)
    q = args.quick
    only = set(args.only.split(",")) if args.only else None
    MACHINE.update(machine())
    create_database()
    results: list[Result] = []
    try:
        plan: list[tuple[str, Callable[[], list[Result]]]] = [
            ("publish", lambda: bench_publish(200 if q else 5_000, 1 if q else 5)),
            ("dispatch", lambda: bench_dispatch(100 if q else 5_000, 30 if q else 1_000, 1 if q else 3)),
            ("matching", lambda: bench_matching(100 if q else 5_000, 1 if q else 3)),
            ("e2e", lambda: bench_latency_and_throughput(1 if q else 30, 50 if q else 200, 100 if q else 2_000)),
            ("logwriter", lambda: bench_log_writer(200 if q else 20_000, 50 if q else 2_000, 1 if q else 3)),
            ("memory", lambda: bench_memory(100 if q else 1_000, 1_000 if q else 100_000)),
        ]
        for key, run in plan:
            if only is None or key in only:
                started = time.perf_counter()
                results.extend(run())
                print(f"[{key}: {time.perf_counter() - started:.1f}s]", file=sys.stderr)
    finally:
        wipe(event_bus.sync_client())
        drop_database()
    print_table(results)
    Path(args.output).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
