"""Real processes for the end-to-end benchmarks: a Celery worker, a router, and waiting on them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.harness import PREFIX, ROOT
from project.events import event_bus

__all__ = [
    "DONE_KEY",
    "LATENCY_KEY",
    "STAGES_DIR",
    "end_to_end",
    "paced",
    "processes",
    "router_cmd",
    "rss_kb",
    "wait_until",
    "warm_up",
    "worker_cmd",
]

# Counted by every no-op handler and baseline task (bench.handlers, bench.tasks).
DONE_KEY = f"{PREFIX}:bench:done"
# Seconds from send to start, one per probe (bench.handlers.latency_probe, bench.tasks.probe).
LATENCY_KEY = f"{PREFIX}:bench:latency"
# Where the end-to-end stack's router and worker note the stages of each probe
# (bench.router_probe, bench.tasks): read by bench.latency, removed with the stack.
STAGES_DIR = Path(tempfile.gettempdir()) / f"{PREFIX}-stages"


@contextmanager
def processes(
    *commands: list[str], env: Mapping[str, str] | None = None, label: str = PREFIX
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run ``commands`` in the repository (logs in ``bench/.logs/<label>-<n>.log``); stop them on the way out.

    ``env`` is added to the environment they inherit.
    """
    logs = ROOT / "bench" / ".logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        out = (logs / f"{label}-{i}.log").open("wb")
        # The environment bench.harness fixed (prefix, database, handlers) is inherited.
        full_env = None if env is None else {**os.environ, **env}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT))
        out.close()  # the child has its own copy of the descriptor
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
                p.wait()


@contextmanager
def end_to_end() -> Iterator[redis.Redis]:
    """A worker (2 processes) and a router with its log writer, warm on both paths; yields a client.

    Latency and throughput share one stack, measured one after the other, as they always were.
    The router runs as :mod:`bench.router_probe` and both note the latency probes' stages in
    :data:`STAGES_DIR` (lines appended to files, no Redis command).
    """
    from bench.tasks import count

    client = event_bus.sync_client()
    STAGES_DIR.mkdir(exist_ok=True)
    try:
        with processes(worker_cmd(), router_cmd(stages=True), env={"BENCH_STAGES_DIR": str(STAGES_DIR)}):
            warm_up(client, lambda: event_bus.publish_sync("bench.one.made"))
            warm_up(client, lambda: count.apply_async(queue="bench"))
            yield client
    finally:
        shutil.rmtree(STAGES_DIR, ignore_errors=True)


def worker_cmd(
    node: str = f"bench-{PREFIX}",
    *,
    app: str = "project.celery_app",
    queue: str = "bench",
    imports: str = "bench.tasks",
) -> list[str]:
    """A Celery worker of two prefork processes on ``queue``: by default ours, with our
    handlers and the baseline tasks (``imports``: ``-I``, none if empty)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-c", "2", "-P", "prefork",
            *(["-I", imports] if imports else []), "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
            "-n", f"{node}@%h"]  # fmt: skip


def router_cmd(log_writer: bool = True, *, stages: bool = False) -> list[str]:
    """A router, with the log writer in the same process unless ``log_writer`` is False.

    ``stages``: run it as :mod:`bench.router_probe`, which notes when it read each batch and
    ran each dispatch script (given ``BENCH_STAGES_DIR`` in its environment).
    """
    return [sys.executable, "-m", "bench.router_probe" if stages else "project.cli", "--log-level", "WARNING",
            "router", *([] if log_writer else ["--no-log-writer"])]  # fmt: skip


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``condition`` until it holds; raise ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.01)


def warm_up(client: redis.Redis, send: Callable[[], object], count: int = 20) -> None:
    """Send ``count`` counted tasks and wait until all ran: imports, connections and pools are warm."""
    client.delete(DONE_KEY)
    for _ in range(count):
        send()
    wait_until(lambda: int(client.get(DONE_KEY) or 0) >= count, 60)
    client.delete(DONE_KEY)


def paced(rate_per_s: float, duration_s: float, send: Callable[[], object]) -> int:
    """Call ``send`` ``rate_per_s`` times a second for ``duration_s``; return how many were sent."""
    interval, start, sent = 1.0 / rate_per_s, time.perf_counter(), 0
    while (now := time.perf_counter() - start) < duration_s:
        if now >= sent * interval:
            send()
            sent += 1
        else:
            time.sleep(min(interval / 4, sent * interval - now))
    return sent


def rss_kb(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")
