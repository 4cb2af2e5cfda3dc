"""Redis commands per handler run, end to end, against a bare ``apply_async`` task on the same worker.

A count, not a timing: Redis counts the commands itself (``INFO commandstats``, which also
counts every command a script runs, besides the EVAL/EVALSHA that runs it, and the MULTI
and EXEC of a transaction), so machine noise does not move the figure. Commandstats are
server-wide, so this benchmark starts a Redis of its own (``redis-server`` on a free port,
no persistence), resets its counters with ``CONFIG RESETSTAT`` before each count, and runs
against it, through ``REDIS_URL``, a worker (2 prefork processes), a router with its log
writer and reconciler (as ``make run`` runs it) and a sending process
(:mod:`bench.command_driver`), all with this run's prefix and database.

- Ours: events that two handlers subscribe to (``bench.pair.made``), from publish through
  routing, running, recording (the delivery records the workers append) and logging (the
  log writer, until PostgreSQL holds every record), over the handler runs.
- Baseline: the bare task ``bench.tasks.count`` sent with ``apply_async``, run by the same
  worker, over its runs. The handlers and the task do the same one INCR.

The row with the target is lockstep: one event (or task) at a time, the next sent once the
last one's runs are counted, so nothing shares a batch and the count repeats run after
run. A burst (all sent back to back, so the router and the log writer batch) is a
reference row. Not counted: the driver's polling GETs (it reports them) and this module's
INFO and CONFIG. Counted: what the processes do meanwhile on their own (blocking reads that
time out, periodic chores), measured alone as the idle rate and printed with the breakdown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
import sqlalchemy as sa

from bench.command_driver import RUNS
from bench.harness import PREFIX, ROOT, Result, result
from bench.stack import processes, router_cmd, wait_until, worker_cmd
from project.settings import get_settings
from project.tables import event_deliveries

__all__ = ["bench_commands", "private_redis"]

TARGET = 1.5  # ours may send at most 1.5 times the commands per run of a bare task
SETTLE_S = 0.5  # after the last run: the acknowledgements and the log writer's XACK/XDEL
IDLE_S = 2.0
TOP = 10  # commands named in a row's note
# This module's own commands on the private Redis (the driver reports its own).
_OURS_ONLY = ("info", "config")


@contextmanager
def private_redis() -> Iterator[str]:
    """A ``redis-server`` of this benchmark's own on a free port (no persistence); yields its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("bench.commands needs redis-server on PATH (a private Redis to count commands on)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with processes(cmd, label=f"{PREFIX}-redis"):
        client = redis.Redis.from_url(url)
        try:
            wait_until(lambda: _answers(client), 10)
        finally:
            client.close()
        yield url


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class _Driver:
    """The sending process (:mod:`bench.command_driver`), one request line and one answer at a time."""

    def __init__(self, env: Mapping[str, str]) -> None:
        logs = ROOT / "bench" / ".logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{PREFIX}-command-driver.log").open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.command_driver"], cwd=ROOT, env={**os.environ, **env},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip

    def run(self, mode: str, kind: str, count: int) -> Counter[str]:
        """Send ``count`` of ``kind`` in ``mode``; the commands the driver sent itself, by name."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(f"{mode} {kind} {count}\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the command driver exited (log in bench/.logs/{PREFIX}-command-driver.log)")
        return Counter(json.loads(answer)["own"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def commandstats(client: redis.Redis) -> Counter[str]:
    """Calls per command (``client|setinfo`` for a subcommand) since the last reset, but this module's own."""
    raw: Any = client.info("commandstats")
    calls: Counter[str] = Counter()
    for key, stats in raw.items():
        name = key.removeprefix("cmdstat_")
        if name.split("|")[0] not in _OURS_ONLY:
            calls[name] = int(stats["calls"])
    return calls


def bench_commands(lockstep: tuple[int, int], burst: tuple[int, int]) -> list[Result]:
    """Commands per run: ``(events, tasks)`` sent in lockstep (the target), then in a burst."""
    engine = sa.create_engine(get_settings().database_url)
    try:
        with private_redis() as url:
            env = {"REDIS_URL": url}
            client = redis.Redis.from_url(url)
            driver = _Driver(env)
            stack = processes(worker_cmd(f"bench-commands-{PREFIX}"), router_cmd(), env=env, label=f"{PREFIX}-commands")
            try:
                with stack:
                    return _measure(client, driver, engine, lockstep, burst)
            finally:
                driver.close()
                client.close()
    finally:
        engine.dispose()


def _measure(
    client: redis.Redis, driver: _Driver, engine: sa.Engine, lockstep: tuple[int, int], burst: tuple[int, int]
) -> list[Result]:
    def succeeded() -> int:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).where(event_deliveries.c.status == "succeeded")
            return int(conn.execute(query).scalar_one())

    def count(mode: str, kind: str, n: int) -> Counter[str]:
        logged = succeeded()
        client.config_resetstat()
        own = driver.run(mode, kind, n)
        if kind == "publish":  # until PostgreSQL holds the last run's record
            wait_until(lambda: succeeded() >= logged + RUNS[kind] * n, 120)
        time.sleep(SETTLE_S)
        calls = commandstats(client)
        calls.subtract(own)
        return +calls

    # Warm: connections, scripts, the queue's binding, both pool processes.
    for kind in ("publish", "apply"):
        count("lockstep", kind, 20)
    client.config_resetstat()
    time.sleep(IDLE_S)
    idle = commandstats(client)

    measured = {
        (mode, kind): (count(mode, kind, n), RUNS[kind] * n)
        for mode, (n_events, n_tasks) in (("lockstep", lockstep), ("burst", burst))
        for kind, n in (("publish", n_events), ("apply", n_tasks))
    }
    _print_breakdown(measured, idle)

    results = []
    for mode, name, target in (("lockstep", "Redis commands per handler run", TARGET),
                               ("burst", "Redis commands per handler run, burst", None)):  # fmt: skip
        (ours, ours_runs), (base, base_runs) = measured[mode, "publish"], measured[mode, "apply"]
        how = ("one event (or task) at a time, none sharing a batch" if mode == "lockstep"
               else "all sent back to back: the router and the log writer batch")  # fmt: skip
        note = (f"INFO commandstats on a private Redis, {how}; ours: {ours_runs // 2} events x 2 handlers, "
                f"publish to logged; baseline: {base_runs} bare apply_async tasks; per run, ours: "
                f"{_top(ours, ours_runs)}; baseline: {_top(base, base_runs)}")  # fmt: skip
        results.append(result(name, ours.total() / ours_runs, base.total() / base_runs, target, "commands/run",
                              lower_is_better=True, note=note))  # fmt: skip
    return results


def _top(calls: Counter[str], runs: int) -> str:
    return ", ".join(f"{name} {n / runs:.2f}" for name, n in calls.most_common(TOP))


def _print_breakdown(measured: dict[tuple[str, str], tuple[Counter[str], int]], idle: Counter[str]) -> None:
    """Every command per run, on both sides and in both modes (stderr, with the idle rate)."""
    columns = [("lockstep", "publish"), ("lockstep", "apply"), ("burst", "publish"), ("burst", "apply")]
    names = sorted({n for calls, _ in measured.values() for n in calls}, key=lambda n: -measured[columns[0]][0][n])
    print("Redis commands per handler run (bench.commands):", file=sys.stderr)
    header = ["command", "ours lockstep", "base lockstep", "ours burst", "base burst"]
    rows = [[n, *(f"{measured[c][0][n] / measured[c][1]:.3f}" for c in columns)] for n in names]
    rows.append(["total", *(f"{measured[c][0].total() / measured[c][1]:.3f}" for c in columns)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  " + "  ".join(cells), file=sys.stderr)
    per_s = ", ".join(f"{n} {c / IDLE_S:.1f}" for n, c in idle.most_common())
    print(f"  idle, nothing sent ({IDLE_S:g} s): {idle.total() / IDLE_S:.1f} commands/s ({per_s})", file=sys.stderr)
