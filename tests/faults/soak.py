"""The soak: events at a steady rate for minutes while a random router, worker or log writer
is killed every ``SOAK_KILL_EVERY_S``, then the fault suite's checker over everything.

    make soak                                   # 5 minutes at 200 events/s, a kill every 20 s
    SOAK_SECONDS=30 .venv/bin/python -m tests.faults.soak

Settings (environment): ``SOAK_SECONDS`` (300), ``SOAK_RATE`` (events/s, 200),
``SOAK_KILL_EVERY_S`` (20), ``SOAK_SEED`` (random). Runs on a private redis-server and its
own database; prints one summary line and exits 1 if the checker found a problem.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.checker import check
from tests.faults.harness import Lab, Stack, children, laboratory

# Most events have one plain handler; some add the exactly-once handlers (Redis and SQL).
MIX = (("fault.ping.sent", 0.80), ("fault.cache.done", 0.15), ("fault.work.done", 0.05))
WORKER_CONCURRENCY = 2


class Soak:
    """The processes of the soak and the kills done to them."""

    def __init__(self, stack: Stack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        self.kills: dict[str, int] = {}
        self.repeats_budget = 0
        self.serial = 0

    def _name(self, role: str) -> str:
        self.serial += 1
        return f"{role}-{self.serial}"

    def live(self, role: str) -> list[str]:
        return [p.name for p in self.stack.procs.values() if p.role == role and p.must_live]

    def start(self) -> None:
        for _ in range(2):
            self.stack.start_router(self._name("router"), "--no-log-writer")
            self.stack.start_log_writer(self._name("log-writer"))
            self.stack.start_worker(self._name("worker"), concurrency=WORKER_CONCURRENCY)

    def kill_one(self) -> str:
        """SIGKILL a random process (for a worker: a pool child, or the whole worker) and replace it."""
        kind = self.rng.choice(["router", "log-writer", "worker", "worker-child"])
        stack = self.stack
        if kind == "worker-child":
            name = self.rng.choice(self.live("worker"))
            kids = children(stack.procs[name].pid)
            if kids:
                os.kill(self.rng.choice(kids), signal.SIGKILL)  # the pool replaces it
                self.repeats_budget += 1  # the one delivery it ran
            return self._count(kind)
        name = self.rng.choice(self.live(kind))
        if kind == "worker":
            proc = stack.procs[name]
            proc.must_live = False
            os.killpg(proc.pid, signal.SIGKILL)  # a worker host dying: main and pool at once
            proc.popen.wait(timeout=30)
            # Each process of the pool held at most one running and one prefetched delivery.
            self.repeats_budget += 2 * WORKER_CONCURRENCY
            stack.start_worker(self._name("worker"), concurrency=WORKER_CONCURRENCY)
        else:
            stack.kill(name)
            if kind == "router":
                stack.start_router(self._name("router"), "--no-log-writer")
            else:
                stack.start_log_writer(self._name("log-writer"))
        return self._count(kind)

    def _count(self, kind: str) -> str:
        self.kills[kind] = self.kills.get(kind, 0) + 1
        return kind


def run(lab: Lab, seconds: float, rate: float, kill_every_s: float, seed: int) -> int:
    rng = random.Random(seed)
    server = lab.redis_server()
    stack = lab.stack(redis_url=server.url)
    soak = Soak(stack, rng)
    soak.start()
    weights = [w for _, w in MIX]
    types = rng.choices([t for t, _ in MIX], weights, k=int(seconds * rate))
    started = time.monotonic()
    print(
        f"soak: {len(types)} events over {seconds:.0f}s at {rate:.0f}/s, a kill every {kill_every_s:.0f}s, seed {seed}"
    )
    publishers = []
    for event_type, _ in MIX:
        count = types.count(event_type)
        if count:
            share = count / len(types)
            publishers.append(stack.publish_in_background(event_type, count, rate_per_s=rate * share))
    next_kill = started + kill_every_s
    while running := [p.thread for p in publishers if p.thread is not None and p.thread.is_alive()]:
        if time.monotonic() >= next_kill:
            kind = soak.kill_one()
            print(
                f"soak: {time.monotonic() - started:6.1f}s killed a {kind}; {len(stack.published)} published",
                flush=True,
            )
            next_kill += kill_every_s
        running[0].join(timeout=max(0.0, min(1.0, next_kill - time.monotonic())))
    for publisher in publishers:
        publisher.join(timeout_s=seconds + 120)
    print(f"soak: published {len(stack.published)} in {time.monotonic() - started:.0f}s; draining", flush=True)
    total_kills = sum(soak.kills.values())
    try:
        verdict = check(stack, kills=total_kills, repeats_budget=soak.repeats_budget, timeout_s=max(300.0, seconds))
    except AssertionError as exc:
        print(f"soak: FAILED ({soak.kills})\n{exc}")
        for name in stack.procs:
            tail = stack.log(name)[-1500:]
            if "Traceback" in tail or "ERROR" in tail:
                print(f"----- {name} -----\n{tail}")
        return 1
    print(f"soak: {verdict.line()} ({', '.join(f'{k}: {n}' for k, n in sorted(soak.kills.items()))})")
    return 0


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "300"))
    rate = float(os.environ.get("SOAK_RATE", "200"))
    kill_every_s = float(os.environ.get("SOAK_KILL_EVERY_S", "20"))
    seed = int(os.environ.get("SOAK_SEED", str(random.SystemRandom().randrange(10**6))))
    with tempfile.TemporaryDirectory(prefix="eventbus-soak-") as tmp, laboratory(Path(tmp)) as lab:
        return run(lab, seconds, rate, kill_every_s, seed)


if __name__ == "__main__":
    sys.exit(main())
