"""What metrics and tracing cost: publish and end-to-end throughput with both off, then both on.

Two sides run at once, each with its own ``EVENTS_PREFIX``: "off" as the bus runs by default
(``METRICS_ENABLED`` off, no tracer provider), and "on" with both switched on as in
production: ``METRICS_ENABLED`` (the worker in prometheus_client's multiprocess mode, the
router with its own registry, the publisher recording too) and the OpenTelemetry SDK in
every process (:mod:`bench.null_tracing`: spans made and batched, exported nowhere), so every
publish runs in a span and every event carries its trace context to the handler's span.
Metrics are recorded but not scraped. A third side publishes as "on" does, but with the
SDK's head sampling at one trace in ten (``parentbased_traceidratio``, 0.1), as a busy
production setup would run it: a reference row, compared with "off" the same way.

Each side publishes from a process of its own (:mod:`bench.publisher`), since a process
cannot switch its tracer provider off again. The sides take turns, in chunks for publish and
in whole drains end to end, starting with each side in alternate pairs; the ratio quoted is
the median of the per-pair ratios (on / off).

Both publishers are pinned to the same CPU. Left to the scheduler, one of them could keep
landing on the CPU Redis runs on while the other did not: on a small virtual machine a
round trip that has to wake an idle CPU costs a few times one that does not, so the off
publisher ran three times as fast as it does alone (and the ratio read 0.35) for reasons
that had nothing to do with metrics or tracing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import redis

from bench.harness import PREFIX, ROOT, Result, median_pairs, pair_chunks, result
from bench.stack import processes, router_cmd, wait_until, worker_cmd
from project.events import event_bus
from project.keys import Keys

__all__ = ["bench_observability"]

PUBLISH_TYPE = "bench.item.made"  # as the publish benchmark: three subscriptions, none running here
E2E_TYPE = "bench.one.made"  # as the throughput benchmark: one no-op handler
TARGET = 0.9  # both on may cost at most 10%
# The head sampling a production setup would use at this rate of events: one trace in ten.
SAMPLED = ("parentbased_traceidratio", "0.1")
# Both sides' publishers run on this CPU (where the OS can pin a process).
PUBLISHER_CPU = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


@dataclass
class _Side:
    """One configuration: its prefix, its environment and its publishing process."""

    name: str
    prefix: str
    env: dict[str, str]
    publisher: subprocess.Popen[str]

    @property
    def done_key(self) -> str:
        return f"{self.prefix}:bench:done"  # counted by bench.handlers

    def publish(self, count: int, event_type: str) -> float:
        """Have the side's publisher publish ``count`` events; its rate (events/s)."""
        stdin, stdout = self.publisher.stdin, self.publisher.stdout
        assert stdin is not None and stdout is not None
        stdin.write(f"{event_type} {count}\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the {self.name} publisher exited (log in bench/.logs/{self.prefix}-publisher.log)")
        return float(answer)


def bench_observability(n_publish: int, n_e2e: int, rounds: int) -> list[Result]:
    """``publish_sync`` rate and end-to-end throughput, metrics and tracing on against off.

    Publish alternates chunks of ``n_publish / 10`` events, ``rounds`` times ``n_publish`` a
    side; end to end alternates ``rounds`` drains of ``n_e2e`` events a side through a router
    (with its log writer) and a worker of two processes.
    """
    client = event_bus.sync_client()
    with ExitStack() as stack:
        off = stack.enter_context(_side("off", observed=False))
        on = stack.enter_context(_side("on", observed=True))
        sampled = stack.enter_context(_side("sampled", observed=True, sampler=SAMPLED))
        stack.callback(_wipe, client, on, off, sampled)
        chunk, count = pair_chunks(n_publish, rounds)
        publish = median_pairs(_pair(i, lambda s: s.publish(chunk, PUBLISH_TYPE), on, off) for i in range(count))
        publish_sampled = median_pairs(
            _pair(i, lambda s: s.publish(chunk, PUBLISH_TYPE), sampled, off) for i in range(count)
        )
        _wipe(client, on, off, sampled)  # nothing consumed those: the stacks must not start on them
        for side in (off, on):
            stack.enter_context(_stack(side))
        for side in (off, on):
            _drain(client, side, 20)  # imports, connections and pools warm on both paths
        e2e = median_pairs(_pair(i, lambda s: _drain(client, s, n_e2e), on, off) for i in range(rounds))
    note = "ours: metrics and tracing on; baseline: both off; ratio: median of alternating pairs"
    return [
        result("observability: publish (publish_sync), on vs off", publish[0], publish[1], TARGET, "events/s",
               ratio=publish[2], note=note),
        result("observability: publish (publish_sync), on with 10% of traces sampled vs off", publish_sampled[0],
               publish_sampled[1], None, "events/s", ratio=publish_sampled[2],
               note=f"OTEL_TRACES_SAMPLER={SAMPLED[0]}, OTEL_TRACES_SAMPLER_ARG={SAMPLED[1]}: a publish outside "
                    "a trace starts one in ten; metrics on"),
        result("observability: throughput end to end, on vs off", e2e[0], e2e[1], TARGET, "events/s", ratio=e2e[2],
               note=note + "; no-op handlers, 2 worker processes, router and log writer"),
    ]  # fmt: skip


def _pair(i: int, measure: Callable[[_Side], float], on: _Side, off: _Side) -> tuple[float, float]:
    """``(measure(on), measure(off))``, the off side first in even pairs: neither always goes first."""
    if i % 2 == 0:
        base = measure(off)
        return measure(on), base
    ours = measure(on)
    return ours, measure(off)


def _drain(client: redis.Redis, side: _Side, n: int) -> float:
    """Publish ``n`` events on ``side`` and wait until its handlers ran them all; events/s.

    Then wait until its router and log writer have caught up, so that their tail does not
    run into the other side's turn.
    """
    client.delete(side.done_key)
    start = time.perf_counter()
    side.publish(n, E2E_TYPE)
    wait_until(lambda: int(client.get(side.done_key) or 0) >= n, 300)  # type: ignore[arg-type]
    rate = n / (time.perf_counter() - start)
    _settle(client, Keys(side.prefix))
    return rate


def _settle(client: redis.Redis, keys: Keys) -> None:
    def idle() -> bool:
        for stream in (keys.stream, keys.log_buffer):
            groups: Any = client.xinfo_groups(stream) if client.exists(stream) else []
            if any(g["pending"] or g["lag"] for g in groups):
                return False
        return True

    wait_until(idle, 120)


@contextmanager
def _side(name: str, *, observed: bool, sampler: tuple[str, str] | None = None) -> Iterator[_Side]:
    """A side's environment and its publisher process (stopped on the way out).

    ``sampler``: the OpenTelemetry SDK's ``OTEL_TRACES_SAMPLER`` and its argument.
    """
    prefix = f"{PREFIX}-obs-{name}"
    env = {"EVENTS_PREFIX": prefix, "METRICS_ENABLED": "true" if observed else "false"}
    if sampler is not None:
        env.update(OTEL_TRACES_SAMPLER=sampler[0], OTEL_TRACES_SAMPLER_ARG=sampler[1])
    if observed:
        env.update(
            EVENT_HANDLER_MODULES="bench.handlers,bench.null_tracing",
            METRICS_ADDRESS="127.0.0.1",
            METRICS_ROUTER_PORT=str(_free_port()),
            METRICS_WORKER_PORT=str(_free_port()),
        )
    logs = ROOT / "bench" / ".logs"
    logs.mkdir(exist_ok=True)
    log = (logs / f"{prefix}-publisher.log").open("wb")
    pin = [] if PUBLISHER_CPU is None else ["--cpu", str(PUBLISHER_CPU)]
    cmd = [sys.executable, "-m", "bench.publisher", *pin, *(["--observed"] if observed else [])]
    publisher = subprocess.Popen(
        cmd, cwd=ROOT, env=_environ(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
    )
    log.close()  # the child has its own copy of the descriptor
    try:
        yield _Side(name, prefix, env, publisher)
    finally:
        _close(publisher.stdin)
        try:
            publisher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            publisher.kill()
            publisher.wait()
        _close(publisher.stdout)


@contextmanager
def _stack(side: _Side) -> Iterator[None]:
    """A worker of two processes and a router with its log writer, for ``side``."""
    with ExitStack() as stack:
        worker_env = dict(side.env)
        if side.env["METRICS_ENABLED"] == "true":
            worker_env["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(processes(worker_cmd(f"bench-{side.prefix}"), env=worker_env, label=f"{side.prefix}-w"))
        stack.enter_context(processes(router_cmd(), env=side.env, label=f"{side.prefix}-r"))
        yield


def _wipe(client: redis.Redis, *sides: _Side) -> None:
    for side in sides:
        for key in client.scan_iter(match=f"{side.prefix}:*", count=1000):
            client.delete(key)


def _environ(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def _close(stream: IO[str] | None) -> None:
    if stream is not None:
        stream.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
