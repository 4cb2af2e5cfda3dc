"""Redis misbehaving: connections killed every few ms, a worker host cut off for 30 s, the
server crashed (SIGKILL, or its host's power cut) and restarted with each fsync policy. Each on a
private redis-server."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from tests.faults.checker import check
from tests.faults.harness import Lab, PrivateRedis, Stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_redis_server")]


class ConnectionKiller(threading.Thread):
    """Runs ``CLIENT KILL TYPE normal`` every ``interval_s`` (its own connection is spared)."""

    def __init__(self, server: PrivateRedis, interval_s: float) -> None:
        super().__init__(name="connection-killer", daemon=True)
        self.server = server
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.rounds = 0
        self.killed = 0

    def run(self) -> None:
        client = self.server.client()
        try:
            while not self.stopped.wait(self.interval_s):
                try:
                    self.killed += int(client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
                    self.rounds += 1
                except redis.RedisError:
                    pass
        finally:
            client.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


def _runs_despite_kills(stack: Stack) -> int:
    try:
        return len(stack.runs())
    except redis.RedisError:  # the inspecting client's connection is killed too
        return 0


@pytest.mark.timeout(180)
def test_redis_connections_killed_every_few_ms_lose_nothing_and_apply_nothing_twice(lab: Lab) -> None:
    server = lab.redis_server()
    stack = lab.stack(redis_url=server.url)
    stack.start_router()
    stack.start_worker(concurrency=2)
    killer = ConnectionKiller(server, interval_s=0.01)
    killer.start()
    try:
        publisher = stack.publish_in_background("fault.work.done", 120, rate_per_s=40)
        publisher.join(120)
        # Keep killing while the deliveries run and are recorded, for a few seconds more.
        until = time.monotonic() + 4
        wait_for(lambda: time.monotonic() > until or _runs_despite_kills(stack) >= 240, timeout_s=30, interval_s=0.1)
    finally:
        killer.stop()
    # kombu's Redis transport can be left consuming nothing after its connections were killed
    # mid-command, while the worker process stays up. In production a liveness check restarts
    # such a worker (compose's healthcheck runs `celery inspect ping`); do what it would do.
    # Nothing it held is lost: the reconciler and the visibility timeout send it again.
    stack.stop("worker")
    stack.start_worker("worker-after", concurrency=2)
    print(
        f"connection kills: {killer.killed} connections in {killer.rounds} rounds; "
        f"publish retries: {stack.publish_retries}; untyped publish errors: {len(stack.raw_publish_errors)}"
    )
    assert killer.killed > 50, "the killer hardly killed anything: the scenario proved nothing"
    # Failed attempts run plain handlers again, by design; each rerun must be a counted attempt
    # (the checker verifies runs <= attempts) and every effect must still happen exactly once.
    check(stack, kills=killer.killed, repeats_budget=float("inf"), timeout_s=60)
    assert not stack.raw_publish_errors, f"publish raised untyped errors: {stack.raw_publish_errors[:3]}"


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("needs_netns")
def test_worker_host_cut_off_from_redis_for_30s_then_reconnected(lab: Lab) -> None:
    host = lab.netns()
    server = lab.redis_server(binds=("127.0.0.1", host.host_address))
    wait_for(lambda: host.reachable(server.port), timeout_s=10, what="Redis reachable from the namespace")
    stack = lab.stack(redis_url=server.url)  # router, log writer and the other workers: host side
    stack.start_router()
    stack.start_worker("worker-host", queues="fa", concurrency=1)
    cut_off = stack.start_worker(
        "worker-cut",
        queues="fa",
        concurrency=2,
        netns=host,
        REDIS_URL=server.url_on(host.host_address),
        FAULT_NODE="netns",
    )
    # Events keep coming before, during and after the cut.
    publisher = stack.publish_in_background("fault.cache.done", 90, rate_per_s=2, data={"sleep_s": 0.4})
    wait_for(lambda: stack.busy_on("netns") >= 1, timeout_s=30, interval_s=0.01, what="the cut-off worker mid-task")
    host.cut()
    cut_at = time.monotonic()
    runs_on = lambda node: int(stack.redis.hget(stack.test_key("node-runs"), node) or 0)  # noqa: E731
    before = runs_on("host")
    # The host side goes on without it.
    wait_for(lambda: runs_on("host") > before + 3, timeout_s=25, what="host-side workers to go on")
    # Past the visibility timeout, a worker started now takes over what the cut-off one held.
    vt = float(stack.env["BROKER_VISIBILITY_TIMEOUT_S"])
    wait_for(lambda: stack.unacked_older_than(vt), timeout_s=25, interval_s=0.2, what="the visibility timeout")
    stack.start_worker("worker-host-2", queues="fa", concurrency=1)
    # Hold the cut for its 30 s (the fault's duration, not a synchronisation).
    wait_for(lambda: time.monotonic() - cut_at >= 30, timeout_s=40, interval_s=0.5)
    cut_off_runs = runs_on("netns")
    host.restore()
    wait_for(lambda: runs_on("netns") > cut_off_runs + 2, timeout_s=60, what="the cut-off worker to work again")
    publisher.join(60)
    # What the cut-off worker held (2 running + 2 prefetched at most) may run twice.
    check(stack, kills=1, repeats_budget=4, timeout_s=90)
    assert cut_off.alive(), "the cut-off worker did not survive the partition"


CRASHES = [
    pytest.param("always", "process", id="always-process-killed"),
    pytest.param("everysec", "process", id="everysec-process-killed"),
]
# The power-cut variants mount an ext4 image on a loop device; a run killed or timed out
# mid-scenario can leave that mount busy on the machine, which then fails later test runs'
# cleanup. So they run only when asked for: FAULTS_POWER_CUT=1.
if os.environ.get("FAULTS_POWER_CUT") == "1":
    CRASHES += [
        pytest.param("always", "host", id="always-power-cut"),
        pytest.param("everysec", "host", id="everysec-power-cut"),
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("fsync", "crash"), CRASHES)
def test_redis_crash_then_restart_on_its_aof(lab: Lab, fsync: str, crash: str) -> None:
    """Redis SIGKILLed (a process crash) or its host's power cut (a disk keeping only what
    reached it), mid-stream, then restarted on its AOF. With ``always`` every publish that
    returned must be dispatched and handled; with ``everysec`` the loss is measured."""
    if crash == "host" and os.geteuid() != 0:
        pytest.skip("a crashable disk needs root (losetup, mount)")
    disk = lab.crashable_disk() if crash == "host" else None
    server = lab.redis_server(appendonly=True, appendfsync=fsync, directory=disk.mountpoint if disk else None)
    stack = lab.stack(redis_url=server.url, RECONCILE_AFTER_S="3")
    stack.start_router()
    stack.start_worker(concurrency=2)
    rate = 100
    publisher = stack.publish_in_background("fault.work.done", 3 * rate, rate_per_s=rate)
    wait_for(lambda: len(publisher.ids) >= 1.5 * rate, timeout_s=30, what="events published")
    assert server.proc is not None
    if disk is not None:
        server.proc.send_signal(signal.SIGSTOP)  # the instant of the cut: nothing more is acknowledged
        crashed_at = time.time()
        disk.power_cut()
        server.kill(signal.SIGKILL)
    else:
        server.kill(signal.SIGKILL)
        crashed_at = time.time()
    acknowledged = set(publisher.ids)  # Redis is gone: this cannot grow until the restart
    server.start()
    # kombu can leave a worker consuming nothing after its Redis restarted; production's
    # liveness check (compose: `celery inspect ping`) restarts it. Do what it would do.
    stack.stop("worker")
    stack.start_worker("worker-after", concurrency=2)
    # What Redis itself forgot: publish stores each event with its dedup key, in one script.
    pipe = stack.redis.pipeline(transaction=False)
    for eid in sorted(acknowledged):
        pipe.exists(stack.keys.published(eid))
    forgot = sum(1 for present in pipe.execute() if not present)
    publisher.join(90)
    lossy = fsync != "always"
    verdict = check(stack, kills=1, repeats_budget=float("inf") if lossy else 4, allow_lost=lossy, timeout_s=90)
    lost = [eid for eid in verdict.lost_events if eid in acknowledged]
    window_ms = (crashed_at - min(publisher.acked_at[e] for e in lost)) * 1000 if lost else 0.0
    print(
        f"appendfsync {fsync}, {'power cut' if disk else 'SIGKILL'}: {len(lost)} of {len(acknowledged)} "
        f"acknowledged publishes lost (the last {window_ms:.0f} ms at {rate} events/s), {forgot} forgotten by "
        f"Redis itself; {verdict.line()} {dict(verdict.lost_kinds)}"
    )
    assert len(verdict.lost_events) == len(lost), "an event published after the restart was lost"
    if not lossy:
        assert verdict.lost == 0
    # With everysec the loss is measured and printed above, not asserted: the reliability issue
    # asks for the window to be documented (README, Reliability). A SIGKILL keeps every write in
    # the kernel, so a loss there points at a worker left stuck by kombu after the restart.
