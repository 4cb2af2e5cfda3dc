"""The delivery policy on real workers: time limits, lost processes, long runs, unknown tasks.

Every kind of failure counts as an attempt and ends `succeeded`, `dead` (with module.error) or
`rejected`; never an endless loop, a silent drop, or two copies of a handler at once.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from project.lease import LEASE_AT_HEADER, LEASE_HEADER
from project.messages import FIRST_HEADER, delivery_task_id, task_message
from tests.conftest import wait_for
from tests.integration.conftest import REDIS_URL, ROOT, Stack
from tests.rabbitmq import WITH_CLUSTER

DELIVERY = "SELECT status, attempts, error FROM event_deliveries WHERE event_id = :e AND handler = :h"
APP = "tests.integration.app"


def _delivery(stack: Stack, event_id: str, handler: str, status: str, timeout_s: float = 60) -> object:
    return stack.wait_query(
        DELIVERY, until=lambda r: r and r[0].status == status, timeout_s=timeout_s, e=event_id, h=f"{APP}.{handler}"
    )[0]


def _module_errors(stack: Stack) -> list[dict[str, object]]:
    rows = stack.query("SELECT data FROM events_log WHERE event_type = 'module.error'")
    return [r.data for r in rows]


@pytest.mark.brokers(*WITH_CLUSTER)
def test_handler_past_its_hard_time_limit_is_retried_and_then_succeeds(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.slow.requested", {"slow_runs": 1, "ignore_soft": True})
    row = _delivery(stack, event_id, "slow", "succeeded")
    assert row.attempts == 2  # type: ignore[attr-defined]
    assert stack.runs() == {f"{event_id}:slow": 2}
    assert "Hard time limit (1.5s) exceeded" in stack.log("worker")


@pytest.mark.brokers(*WITH_CLUSTER)
def test_handler_always_past_its_time_limit_ends_dead_with_module_error(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.slow.requested", {"slow_runs": 99, "ignore_soft": True})
    row = _delivery(stack, event_id, "slow", "dead")
    assert row.attempts == 3  # type: ignore[attr-defined]  # max_retries=2
    assert "TimeLimitExceeded" in row.error  # type: ignore[attr-defined]
    report = wait_for(lambda: _module_errors(stack), what="module.error")[0]
    assert report["event_id"] == event_id and report["attempts"] == 3
    stack.settle()
    assert stack.runs() == {f"{event_id}:slow": 3}


def test_soft_time_limit_is_raised_inside_the_handler_first(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.slow.requested", {"slow_runs": 1})
    row = _delivery(stack, event_id, "slow", "succeeded")
    assert row.attempts == 2  # type: ignore[attr-defined]
    assert "SoftTimeLimitExceeded" in stack.log("worker")
    assert "Hard time limit" not in stack.log("worker")


@pytest.mark.brokers(*WITH_CLUSTER)
def test_handler_killing_its_process_counts_attempts_and_ends_dead(stack: Stack) -> None:
    stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    recovers = bus.publish_sync("policy.crash.requested", {"crashes": 2})
    doomed = bus.publish_sync("policy.crash.requested", {"crashes": 99})
    row = _delivery(stack, recovers, "crash", "succeeded", timeout_s=90)
    assert row.attempts == 3  # type: ignore[attr-defined]
    row = _delivery(stack, doomed, "crash", "dead", timeout_s=90)
    assert row.attempts == 3  # type: ignore[attr-defined]  # it ran 3 times; the 4th copy gave up, uncounted
    assert "DeliveryExhausted" in row.error  # type: ignore[attr-defined]
    report = wait_for(lambda: _module_errors(stack), what="module.error")[0]
    assert report["event_id"] == doomed
    assert stack.runs() == {f"{recovers}:crash": 3, f"{doomed}:crash": 3}
    assert stack.procs["worker"].poll() is None


def _unacked(stack: Stack) -> dict[str, str]:
    """kombu's unacknowledged messages: delivery tag -> task id."""
    raw = stack.redis.hgetall(f"{stack.prefix}:celery:unacked")
    return {tag.decode(): json.loads(payload)[0]["headers"]["id"] for tag, payload in raw.items()}


def test_handler_longer_than_the_visibility_timeout_never_runs_twice_at_once(stack: Stack) -> None:
    stack.env.update({"BROKER_VISIBILITY_TIMEOUT_S": "2", "BROKER_RESTORE_INTERVAL_S": "1"})
    stack.start_worker(queues="gamma", concurrency=2)
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.long.requested", {"sleep_s": 8})
    task_id = delivery_task_id(event_id, f"{APP}.long_runner")
    original = wait_for(lambda: [t for t, i in _unacked(stack).items() if i == task_id], what="the task running")
    wait_for(lambda: "another copy holds the lease" in stack.log("worker"), timeout_s=20, what="a restored copy")
    # kombu restored the message with its delivery tag unchanged, so acknowledging either
    # copy removes the other's unacknowledged entry. The deferred copy is a new message with
    # a tag of its own: it is what keeps the delivery safe if the original's worker dies now.
    deferred = wait_for(
        lambda: [t for t, i in _unacked(stack).items() if i == task_id and t not in original],
        what="the deferred copy, unacknowledged under a new tag",
    )
    assert deferred and deferred[0] not in original
    _delivery(stack, event_id, "long_runner", "succeeded", timeout_s=60)
    assert int(stack.redis.get(f"{{{stack.prefix}:test}}:max-running") or 0) == 1
    wait_for(lambda: "this copy is skipped" in stack.log("worker"), timeout_s=30, what="the late copy skipped")
    wait_for(lambda: not _unacked(stack), timeout_s=30, what="nothing left unacknowledged")
    assert stack.queue_length("gamma") == 0
    assert stack.runs() == {f"{event_id}:long_runner": 1}


def _not_first(stack: Stack, queue: str) -> None:
    """Take the router's copy off ``queue`` and put it back as any later copy: no first-copy header."""
    key = stack.bus().keys.celery_queue(queue)
    wait_for(lambda: stack.queue_length(queue) == 1, what="the router's copy queued")
    message = json.loads(stack.redis.rpop(key))  # type: ignore[arg-type]
    del message["headers"][FIRST_HEADER]
    stack.redis.lpush(key, json.dumps(message))


def test_a_delivery_state_that_lapsed_during_the_run_gets_a_ttl_again_when_done(stack: Stack) -> None:
    # A copy other than the router's first is counted in the delivery's hash. The done script
    # leaves the TTL the start script gave it; a hash gone meanwhile (evicted, deleted by hand)
    # is made again by its HSET, and must not outlive its TTL.
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.long.requested", {"sleep_s": 2})
    _not_first(stack, "gamma")
    stack.start_worker(queues="gamma")
    key = stack.bus().keys.scoped("policy.long.requested").delivery(delivery_task_id(event_id, f"{APP}.long_runner"))
    wait_for(lambda: stack.redis.hget(key, "state") == b"running", what="the handler running")
    ttl = stack.redis.ttl(key)
    done_ttl = stack.settings.delivery_done_ttl_s
    assert done_ttl < ttl <= done_ttl + stack.settings.delivery_time_limit_s  # outlives the run
    stack.redis.delete(key)
    row = _delivery(stack, event_id, "long_runner", "succeeded")
    assert row.attempts == 1  # type: ignore[attr-defined]
    assert stack.redis.hget(key, "state") == b"done"
    assert 0 < stack.redis.ttl(key) <= done_ttl


def test_the_first_copy_runs_on_its_lease_alone_and_settles_in_it(stack: Stack) -> None:
    # The router's one send of a delivery starts with a bare SET NX of its lease: no hash is
    # written, and once done the lease key holds the done mark that every later copy meets.
    stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    event_id = bus.publish_sync("policy.long.requested", {"sleep_s": 2})
    task_id = delivery_task_id(event_id, f"{APP}.long_runner")
    keys = bus.keys.scoped("policy.long.requested")
    wait_for(lambda: (stack.redis.get(keys.lease(task_id)) or b"done") != b"done", what="the handler holding its lease")
    assert not stack.redis.exists(keys.delivery(task_id))
    # A copy meanwhile (as a broker restores one) is deferred, and writes nothing the holder's
    # Event.redis_transaction WATCHes: it carries the holder's attempt in its own header.
    [(_, fields)] = stack.redis.xrange(keys.stream)
    copy = task_message(
        task_name=f"{APP}.long_runner", task_id=task_id, queue="gamma", envelope_json=fields[b"e"].decode(),
        event_type="policy.long.requested", event_id=event_id,
    )  # fmt: skip
    stack.redis.lpush(bus.keys.celery_queue("gamma"), copy.redis_form())
    wait_for(lambda: "another copy holds the lease" in stack.log("worker"), what="the copy deferred")
    assert not stack.redis.exists(keys.delivery(task_id))
    row = _delivery(stack, event_id, "long_runner", "succeeded")
    assert row.attempts == 1  # type: ignore[attr-defined]
    assert stack.redis.get(keys.lease(task_id)) == b"done"
    assert 0 < stack.redis.ttl(keys.lease(task_id)) <= stack.settings.delivery_done_ttl_s
    assert not stack.redis.exists(keys.delivery(task_id))

    wait_for(lambda: "this copy is skipped" in stack.log("worker"), what="the deferred copy skipped")
    # Copies that come again, as the router's first (a duplicate send) and as any other, are
    # skipped (a first copy crashing is counted by the copy Celery requeues, marked
    # redelivered: test_handler_killing_its_process_counts_attempts_and_ends_dead).
    for first in (True, False):
        stack.redis.lpush(
            bus.keys.celery_queue("gamma"),
            task_message(
                task_name=f"{APP}.long_runner", task_id=task_id, queue="gamma", envelope_json=fields[b"e"].decode(),
                event_type="policy.long.requested", event_id=event_id, first=first,
            ).redis_form(),
        )  # fmt: skip
    wait_for(lambda: stack.log("worker").count("this copy is skipped") == 3, what="both copies skipped")
    assert stack.runs() == {f"{event_id}:long_runner": 1}


def _holder_pid(stack: Stack, lease: str) -> int:
    """The pid in the token that holds ``lease`` (``host:pid:nonce``), once a handler holds it."""
    wait_for(lambda: (stack.redis.get(lease) or b"done") != b"done", what="the handler holding its lease")
    return int(stack.redis.get(lease).decode().split(":")[-2])  # type: ignore[union-attr]


def _parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


@pytest.mark.brokers("redis", "rabbitmq")
def test_a_first_copys_lease_is_taken_as_the_worker_receives_it_on_a_redis_broker(stack: Stack) -> None:
    # On a Redis broker the worker's main process takes a first copy's lease in the
    # transaction that notes the message unacknowledged, and the pool process that runs it
    # adopts it: no round trip of its own before the handler. So the token names the main
    # process. On RabbitMQ the pool process takes it, as every copy's.
    worker = stack.start_worker(queues="gamma")
    stack.start_router()
    bus = stack.bus()
    keys = bus.keys.scoped("policy.long.requested")
    event_id = bus.publish_sync("policy.long.requested", {"sleep_s": 1.5})
    lease = keys.lease(delivery_task_id(event_id, f"{APP}.long_runner"))
    holder = _holder_pid(stack, lease)
    if stack.settings.broker_is_amqp:
        assert holder != worker.pid and _parent_pid(holder) == worker.pid
    else:
        assert holder == worker.pid
    assert 0 < stack.redis.pttl(lease) <= stack.settings.delivery_lease_s * 1000
    assert _delivery(stack, event_id, "long_runner", "succeeded").attempts == 1  # type: ignore[attr-defined]
    assert stack.redis.get(lease) == b"done"

    # Headers that claim a lease, sent with a message, are not trusted: on a Redis broker the
    # main process drops them, on RabbitMQ the pool process ignores them. A first copy sent
    # again with them (a fresh time, as the main process would write: this host's clock) is
    # skipped, as any copy of a settled delivery.
    [(_, fields)] = stack.redis.xrange(keys.stream)
    forged = task_message(
        task_name=f"{APP}.long_runner", task_id=delivery_task_id(event_id, f"{APP}.long_runner"), queue="gamma",
        envelope_json=fields[b"e"].decode(), event_type="policy.long.requested", event_id=event_id, first=True,
    )  # fmt: skip
    forged.headers[LEASE_HEADER], forged.headers[LEASE_AT_HEADER] = "forged:1:0", time.monotonic()
    stack.send_copy(forged)
    wait_for(lambda: "this copy is skipped" in stack.log("worker"), what="the forged copy skipped")
    assert stack.runs() == {f"{event_id}:long_runner": 1}
    assert stack.redis.get(lease) == b"done"


def _monitored(line: str) -> tuple[str, list[str]]:
    """A line of ``redis-cli monitor``: the client's address and the command's words."""
    client, _, command = line.partition("] ")
    return client.rpartition(" ")[2], shlex.split(command)


@pytest.mark.brokers("redis")
def test_a_first_copys_pool_process_acknowledges_its_message_right_after_its_done_mark(
    stack: Stack, tmp_path: Path
) -> None:
    # With task_acks_late the worker's main process acknowledges each message once its task
    # ran: a round trip in the one process every message passes through. On a Redis broker
    # a first copy's pool process removes its message from kombu's unacked set itself, on
    # the connection and in the pipeline of its done mark, after the mark, and returns
    # 'done'; the main process then sends nothing. A copy that failed, and its retries, are
    # acknowledged by the main process, as before. Every message is removed exactly once,
    # and none is left. (The log buffer's length is never read, so that no first copy's
    # mark needs the done script, whose copies the main process acknowledges: see test_settle.)
    stack.start_worker(queues="gamma", LOG_BUFFER_FULL_POLICY="keep")
    stack.start_router()
    bus = stack.bus()
    monitor_log = tmp_path / "monitor.txt"
    with monitor_log.open("wb") as out:
        monitor = subprocess.Popen(["redis-cli", "-u", REDIS_URL, "monitor"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: monitor_log.read_bytes().startswith(b"OK"), what="redis-cli monitor")
        done_ids = [bus.publish_sync("policy.long.requested", {"sleep_s": 0}) for _ in range(6)]
        flaky_id = bus.publish_sync("flaky.job.requested", {"job": 1})
        for event_id in done_ids:
            assert _delivery(stack, event_id, "long_runner", "succeeded").attempts == 1  # type: ignore[attr-defined]
        assert _delivery(stack, flaky_id, "flaky", "succeeded").attempts == 3  # type: ignore[attr-defined]
        celery = bus.keys.celery_keyprefix
        index, unacked = f"{celery}unacked_index", f"{celery}unacked"
        wait_for(lambda: stack.redis.zcard(index) == 0 and stack.redis.hlen(unacked) == 0, what="every message removed")
        time.sleep(0.5)  # what the main process would still send after the pool processes' results
    finally:
        monitor.terminate()
        monitor.wait()

    commands = [_monitored(line) for line in monitor_log.read_text().splitlines()[1:]]
    noted = [words[3] for _, words in commands if words[:2] == ["ZADD", index]]
    removed: dict[str, list[tuple[int, str]]] = {tag: [] for tag in noted}
    for at, (client, words) in enumerate(commands):
        if words[:2] in (["ZREM", index], ["HDEL", unacked]):
            removed.setdefault(words[2], []).append((at, client))
    assert len(noted) == 9  # six first copies, flaky's and its two retries
    assert {tag: len(r) for tag, r in removed.items()} == {tag: 2 for tag in noted}  # one ZREM and one HDEL each

    stored = {words[2]: words[3] for _, words in commands if words[:2] == ["HSET", unacked]}
    # The pool processes' connections: where a plain SET marked a delivery done.
    pools = {client for client, words in commands if words[:1] == ["SET"] and words[2:3] == ["done"]} - {"lua"}
    for event_id in done_ids:
        task_id = delivery_task_id(event_id, f"{APP}.long_runner")
        [tag] = [tag for tag, raw in stored.items() if task_id in raw]
        lease = bus.keys.scoped("policy.long.requested").lease(task_id)
        [(marked_at, marker)] = [(at, c) for at, (c, cmd) in enumerate(commands) if cmd[:3] == ["SET", lease, "done"]]
        result = re.search(rf"{re.escape(task_id)}\] succeeded in [0-9.e-]+s: '(\w+)'", stack.log("worker"))
        assert result is not None and result[1] == "done"
        assert marker in pools and all(client == marker and at > marked_at for at, client in removed[tag])
    flaky_tags = [tag for tag in noted if delivery_task_id(flaky_id, f"{APP}.flaky") in stored[tag]]
    assert len(flaky_tags) == 3 and all(c not in pools for tag in flaky_tags for _, c in removed[tag])


def test_a_first_copy_restored_before_it_started_still_runs_with_no_retries_left(stack: Stack) -> None:
    # kombu marks a message it restores redelivered, started or not (a worker's prefetched
    # messages, at its shutdown). A redelivered first copy counts a first attempt it cannot
    # see, on record only: a handler without retries (long_runner) must still run.
    stack.start_router()
    event_id = stack.bus().publish_sync("policy.long.requested", {"sleep_s": 0})
    _restore_first_copy(stack, "gamma")
    stack.start_worker(queues="gamma")
    row = _delivery(stack, event_id, "long_runner", "succeeded")
    assert row.attempts == 2  # type: ignore[attr-defined]  # the one it cannot tell from none, counted
    assert stack.runs() == {f"{event_id}:long_runner": 1}


def test_a_worker_stopped_warm_gives_back_the_leases_of_what_it_had_not_started(stack: Stack) -> None:
    # A worker of one process that prefetches four messages runs one and holds three, whose
    # leases its main process took as it received them. Stopped warm, it finishes the one it
    # runs, and kombu puts the three back: their leases go back with them, so the next worker
    # runs them at once instead of deferring them until the leases lapse (two minutes here).
    stack.env["DELIVERY_LEASE_S"] = "120"
    stack.start_router()
    bus, handler = stack.bus(), f"{APP}.long_runner"
    ids = [bus.publish_sync("policy.long.requested", {"sleep_s": 4 if i == 0 else 0}) for i in range(4)]
    leases = [bus.keys.lease(delivery_task_id(e, handler)) for e in ids]
    wait_for(lambda: stack.queue_length("gamma") == 4, what="the router's four copies queued")
    worker = stack.start(
        "worker", sys.executable, "-m", "celery", "-A", "project.celery_app", "worker", "-Q", "gamma", "-c", "1",
        "-P", "prefork", "--prefetch-multiplier", "4", "-n", f"prefetching-{stack.prefix}@%h", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO", ready=" ready.",
    )  # fmt: skip
    wait_for(lambda: stack.runs() == {f"{ids[0]}:long_runner": 1}, what="the first event's handler running")
    # The three others are received, not started: each lease holds the main process' token.
    wait_for(lambda: all(stack.redis.get(k) for k in leases[1:]), what="the prefetched copies' leases taken")
    assert {int(stack.redis.get(k).decode().split(":")[-2]) for k in leases[1:]} == {worker.pid}  # type: ignore[union-attr]
    assert stack.runs() == {f"{ids[0]}:long_runner": 1}

    stack.stop("worker")  # SIGTERM: a warm shutdown, which lets the running handler finish
    assert worker.returncode == 0, stack.log("worker")
    assert _delivery(stack, ids[0], "long_runner", "succeeded").attempts == 1  # type: ignore[attr-defined]
    assert stack.redis.get(leases[0]) == b"done"
    assert [stack.redis.exists(k) for k in leases[1:]] == [0, 0, 0]
    assert stack.queue_length("gamma") == 3
    assert "gave back the leases of 3 of 3 messages put back unstarted" in stack.log("worker")

    started = time.monotonic()
    stack.start_worker("worker2", queues="gamma")
    for event_id in ids[1:]:
        # Put back marked redelivered, each counts the attempt it cannot tell from none (on record only).
        assert _delivery(stack, event_id, "long_runner", "succeeded", timeout_s=60).attempts == 2  # type: ignore[attr-defined]
    assert time.monotonic() - started < 60  # within half a lease: none waited for its lease to lapse
    assert "another copy holds the lease" not in stack.log("worker2")
    assert stack.runs() == {f"{e}:long_runner": 1 for e in ids}


def _restore_first_copy(stack: Stack, queue: str) -> None:
    """Take the router's first copy off ``queue`` and put it back as kombu restores a message."""
    key = stack.bus().keys.celery_queue(queue)
    wait_for(lambda: stack.queue_length(queue) == 1, what="the router's copy queued")
    message = json.loads(stack.redis.rpop(key))  # type: ignore[arg-type]
    assert message["headers"][FIRST_HEADER] == 1
    message["headers"]["redelivered"] = True  # as kombu's _do_restore_message marks it
    message["properties"]["delivery_info"]["redelivered"] = True
    stack.redis.lpush(key, json.dumps(message))


def test_a_presumed_attempt_counts_but_a_real_one_runs_first(stack: Stack) -> None:
    # doomed always fails and has max_retries=2 (3 attempts). A restored first copy presumes
    # its unseen first attempt, which counts: two real ones follow.
    stack.start_router()
    event_id = stack.bus().publish_sync("doomed.job.requested", {})
    _restore_first_copy(stack, "gamma")
    stack.start_worker(queues="gamma")
    row = _delivery(stack, event_id, "doomed", "dead", timeout_s=90)
    assert stack.runs() == {f"{event_id}:doomed": 2}
    assert row.attempts == 3  # type: ignore[attr-defined]  # the presumed one and the two


def test_the_full_start_sent_again_after_it_ran_counts_its_attempt_once(stack: Stack) -> None:
    # redis-py sends a command again when the connection drops after Redis ran it.
    from project.delivery import _START

    keys, task_id = stack.bus().keys, "restart-" + uuid.uuid4().hex
    client = stack.bus().sync_client()
    args = ("tok-1", 30_000, 1, 600, 0)  # token, lease ms, max attempts, state ttl, nothing uncounted
    assert [_text(x) for x in _START(client, [keys.delivery(task_id), keys.lease(task_id)], *args)] == ["run", "1"]
    assert [_text(x) for x in _START(client, [keys.delivery(task_id), keys.lease(task_id)], *args)] == ["run", "1"]
    assert stack.redis.hget(keys.delivery(task_id), "attempts") == b"1"
    other = _START(client, [keys.delivery(task_id), keys.lease(task_id)], "tok-2", 30_000, 1, 600, 0)
    assert _text(other[0]) == "busy" and other[2] == 0  # held by a counted copy


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.brokers(*WITH_CLUSTER)
def test_task_unknown_to_the_workers_is_kept_rejected_and_can_be_sent_again(stack: Stack) -> None:
    # A rolling deploy: the router has a handler the running worker does not have yet.
    stack.start_worker(queues="alpha")
    stack.start_router(EVENT_HANDLER_MODULES=f"{APP},tests.integration.app_next")
    event_id = stack.bus().publish_sync("user.birth_data.updated", user_id="u1")
    handler = "tests.integration.app_next.on_birth_data_next"
    row = stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "rejected", e=event_id, h=handler)[0]
    assert "unknown task" in row.error
    kept = stack.redis.xrange(stack.bus().keys.rejected_tasks)
    assert len(kept) == 1 and kept[0][1][b"task"].decode() == handler
    assert stack.runs() == {f"{event_id}:on_birth_data": 1}

    stack.stop("worker")
    stack.start_worker("worker-next", queues="alpha", EVENT_HANDLER_MODULES=f"{APP},tests.integration.app_next")
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "requeue-rejected"],
        cwd=ROOT, env={**stack.env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"sent {handler}" in out.stdout
    stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=event_id, h=handler)
    assert stack.runs() == {f"{event_id}:on_birth_data": 1, f"{event_id}:on_birth_data_next": 1}
    assert stack.redis.xlen(stack.bus().keys.rejected_tasks) == 0


@pytest.mark.brokers(*WITH_CLUSTER)
def test_reconciler_sends_again_a_delivery_lost_before_any_worker_started_it(stack: Stack) -> None:
    stack.env.update({"RECONCILE_AFTER_S": "1", "RECONCILE_INTERVAL_S": "0.5"})
    stack.start_router()
    bus = stack.bus()
    event_id = bus.publish_sync("user.birth_data.updated", user_id=7)
    stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "dispatched", e=event_id, h=f"{APP}.on_birth_data")
    # What kombu's BRPOP loses when a worker dies with the message in flight.
    wait_for(lambda: stack.queue_length("alpha") == 1, what="the task on its queue")
    stack.purge("alpha")
    wait_for(lambda: stack.queue_length("alpha") == 1, timeout_s=30, what="the reconciler to send it again")
    # The router logs it once RabbitMQ confirmed it (or Redis took it): a moment after.
    wait_for(lambda: "dispatched and never started; sent again" in stack.log("router"), what="the resend logged")
    stack.start_worker(queues="alpha")
    _delivery(stack, event_id, "on_birth_data", "succeeded")
    assert stack.runs() == {f"{event_id}:on_birth_data": 1}
    seen = json.loads(stack.redis.lrange(f"{stack.prefix}:test:seen:on_birth_data", 0, -1)[0])
    assert seen["user_id"] == 7  # rebuilt from the record, with user_id's type


@pytest.mark.brokers(*WITH_CLUSTER)
def test_reconciler_records_a_settled_delivery_and_resends_one_whose_worker_was_lost(stack: Stack) -> None:
    stack.env.update({"RECONCILE_AFTER_S": "1", "RECONCILE_INTERVAL_S": "0.5"})
    stack.start_router()
    bus = stack.bus()
    settled = bus.publish_sync("user.birth_data.updated", user_id="settled")
    orphaned = bus.publish_sync("user.birth_data.updated", user_id="orphaned")
    handler = f"{APP}.on_birth_data"
    for event_id in (settled, orphaned):
        stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "dispatched", e=event_id, h=handler)
    wait_for(lambda: stack.queue_length("alpha") == 2, what="both tasks queued")
    stack.purge("alpha")
    # One was done by a worker whose success record was lost; the other's worker died while
    # running it, after its lease lapsed.
    stack.redis.hset(
        bus.keys.scoped("user.birth_data.updated").delivery(delivery_task_id(settled, handler)),
        mapping={"state": "done", "attempts": 1},
    )
    stack.redis.hset(
        bus.keys.scoped("user.birth_data.updated").delivery(delivery_task_id(orphaned, handler)),
        mapping={"state": "running", "attempts": 1},
    )
    row = stack.wait_query(DELIVERY, until=lambda r: r and r[0].status == "succeeded", e=settled, h=handler)[0]
    assert row.attempts == 1
    wait_for(lambda: stack.queue_length("alpha") == 1, timeout_s=30, what="the orphaned delivery sent again")
    wait_for(lambda: "with no worker holding its lease" in stack.log("router"), what="the resend logged")
    stack.start_worker(queues="alpha")
    _delivery(stack, orphaned, "on_birth_data", "succeeded")
    assert stack.runs() == {f"{orphaned}:on_birth_data": 1}  # the settled one never ran again


def test_a_failed_first_copy_leaves_retrying_in_its_gate_so_a_copy_meanwhile_is_counted(stack: Stack) -> None:
    # A first copy counts its attempt nowhere until it fails: the fail script writes it to the
    # hash and leaves 'retrying' in the lease key for the backoff. A duplicate first copy then
    # finds its bare SET NX refused and goes through the full start, which counts it.
    from project.delivery import _DONE, _FAIL, _START

    keys, task_id = stack.bus().keys, "retrying-" + uuid.uuid4().hex
    hash_key, lease = keys.delivery(task_id), keys.lease(task_id)
    client = stack.bus().sync_client()
    assert client.set(lease, "tok-first", nx=True, px=30_000)  # the first copy's start
    # token, max attempts, state ttl, not final, host, the first copy's one attempt
    reply = _FAIL(client, [hash_key, lease], "tok-first", 3, 600, 0, "host", 1)
    assert [_text(x) for x in reply] == ["retrying", "1"]
    assert stack.redis.get(lease) == b"retrying"
    assert 0 < stack.redis.ttl(lease) <= 600
    assert stack.redis.hget(hash_key, "attempts") == b"1"

    assert not client.set(lease, "tok-dup", nx=True, px=30_000)  # a duplicate first copy: refused
    reply = _START(client, [hash_key, lease], "tok-dup", 30_000, 3, 600, 0)
    assert [_text(x) for x in reply] == ["run", "2"]  # counted, and the gate is its lease now
    assert stack.redis.get(lease) == b"tok-dup"
    # The retry the failure scheduled arrives while the duplicate runs: deferred, not run.
    assert _text(_START(client, [hash_key, lease], "tok-retry", 30_000, 3, 600, 0)[0]) == "busy"
    _DONE(client, [hash_key, keys.log_buffer, keys.log_shed, lease], 600, "", "h", "0", 100, "block", "", "0", "1")
    assert stack.redis.get(lease) == b"done"
    assert stack.redis.hget(hash_key, "state") == b"done"
    assert _text(_START(client, [hash_key, lease], "tok-retry", 30_000, 3, 600, 0)[0]) == "skip"
    stack.redis.delete(hash_key, lease)
