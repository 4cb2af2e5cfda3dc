"""kombu's Redis channel, as the worker runs it (project.kombu_fixes applied), against the real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from kombu.transport import redis as kombu_redis

from project import kombu_fixes
from project.lease import LEASE_HEADER, new_token
from tests.integration.conftest import REDIS_URL, ROOT
from tests.integration.redis_server import redis_server

pytestmark = pytest.mark.integration


def test_a_channel_keeps_one_client_per_connection_pool_and_messages_still_flow() -> None:
    kombu_fixes.apply()
    name = f"kombu-fixes-{uuid.uuid4().hex[:8]}"
    with kombu.Connection(REDIS_URL) as conn:
        channel = conn.channel()
        with channel.conn_or_acquire() as first:
            assert first.ping()
        with channel.conn_or_acquire() as second:
            pass
        assert second is first  # not a new client per operation
        passed = object()
        with channel.conn_or_acquire(passed) as given:
            assert given is passed  # a client handed in is used as it is

        queue = conn.SimpleQueue(name)
        try:
            for i in range(3):
                queue.put({"n": i})
            received = [queue.get(timeout=5) for _ in range(3)]
            assert [m.payload for m in received] == [{"n": 0}, {"n": 1}, {"n": 2}]
            tags = [m.delivery_tag for m in received]
            assert all(first.hexists(channel.unacked_key, tag) for tag in tags)  # held until acked
            for message in received:
                message.ack()
            assert not any(first.hexists(channel.unacked_key, tag) for tag in tags)
            with pytest.raises(queue.Empty):
                queue.get(block=False)

            # kombu drops its pools after a connection error: the next operation gets a
            # client of the new pool, not the one bound to the old.
            channel._disconnect_pools()
            with channel.conn_or_acquire() as after:
                assert after is not first
                assert after.connection_pool is channel.pool
                assert after.ping()
        finally:
            queue.queue.delete()
            queue.close()


def test_a_message_acknowledged_through_a_closed_channel_stays_unacknowledged_and_nothing_raises() -> None:
    # A pool process finished the task after the consumer's connection broke: kombu rebuilt
    # the pool from the closed channel and raised AttributeError, which ended the worker.
    kombu_fixes.apply()
    name = f"kombu-fixes-{uuid.uuid4().hex[:8]}"
    options = {k: f"{name}:{k}" for k in ("unacked_key", "unacked_index_key", "unacked_mutex_key")}
    conn = kombu.Connection(REDIS_URL, transport_options=options)
    channel = conn.channel()
    client = channel.client
    queue = conn.SimpleQueue(name, channel=channel)
    try:
        queue.put({"n": 1})
        queue.put({"n": 2})
        first, second = queue.get(timeout=5), queue.get(timeout=5)
        held = {first.delivery_tag, second.delivery_tag}
        assert {t.decode() for t in client.hkeys(channel.unacked_key)} == held
        # The connection breaks: kombu closes the channel and drops its pools.
        client.delete(name)  # nothing left for the close to restore onto the queue
        channel.qos.restore_unacked = lambda client=None: None  # this test looks at the unacked set as it was
        conn.close()
        channel._disconnect_pools()
        assert channel.connection is None

        first.ack()  # before the fix: AttributeError: 'NoneType' object has no attribute 'client'
        second.reject(requeue=False)
        after = kombu.Connection(REDIS_URL).channel().client
        # Both stay in kombu's unacked set, for the visibility timeout to bring back.
        assert {t.decode() for t in after.hkeys(options["unacked_key"])} == held
    finally:
        cleanup = kombu.Connection(REDIS_URL).channel().client
        cleanup.delete(name, *options.values())


def test_an_acknowledgement_that_fails_on_an_open_channel_still_raises() -> None:
    kombu_fixes.apply()
    with kombu.Connection(REDIS_URL) as conn:
        channel = conn.channel()
        # An AttributeError on a channel that is open is a bug to see, not one to hide.
        channel.qos._remove_from_indices = lambda *args, **kwargs: None
        with pytest.raises(AttributeError):
            channel.qos.ack("no-such-tag")


def _leases_on_receipt(name: str) -> None:
    """Take a lease for each message carrying this test's header (``lease-id``), as the
    worker takes one for a router's first copy: other tests' messages get none."""

    def lease_of(message: Any) -> tuple[str, str, int] | None:
        lease_id = message.headers.get(name)
        return None if lease_id is None else (f"{name}:lease:{lease_id}", new_token(), 60_000)

    kombu_fixes.take_leases_on_receipt(lease_of)


@pytest.mark.parametrize("nothing_runs", [True, False])
def test_messages_put_back_unstarted_give_back_their_leases_only_when_nothing_can_run_them(
    nothing_runs: bool,
) -> None:
    # A worker stopped warm: its pool processes are gone, and kombu puts back what it received
    # and never started. The leases it took on receipt go back too, unless one was settled
    # meanwhile (it holds 'done', not this process' token). With pool processes alive (a
    # broken connection), nothing is given back: one of them may be running a message.
    kombu_fixes.apply()
    name = f"kombu-fixes-{uuid.uuid4().hex[:8]}"
    _leases_on_receipt(name)
    kombu_fixes.release_leases_on_restore(lambda: nothing_runs)
    options = {k: f"{name}:{k}" for k in ("unacked_key", "unacked_index_key", "unacked_mutex_key")}
    cleanup = kombu.Connection(REDIS_URL).channel().client
    try:
        conn = kombu.Connection(REDIS_URL, transport_options=options)
        queue = conn.SimpleQueue(name)
        for i in range(3):
            queue.put({"n": i}, headers={name: str(i)})
        received = [queue.get(timeout=5) for _ in range(3)]
        leases = [f"{name}:lease:{i}" for i in range(3)]
        tokens = [cleanup.get(k) for k in leases]
        assert all(t and t.decode() == m.headers[LEASE_HEADER] for t, m in zip(tokens, received, strict=True))
        cleanup.set(leases[1], "done")  # settled by the pool process that ran it

        conn.close()  # kombu puts back all three

        assert cleanup.llen(name) == 3
        if nothing_runs:
            assert [cleanup.get(k) for k in leases] == [None, b"done", None]
        else:
            assert [cleanup.get(k) for k in leases] == [tokens[0], b"done", tokens[2]]
        # The copies put back carry no lease of this process, whatever happened to the leases.
        assert all(LEASE_HEADER not in json.loads(raw)["headers"] for raw in cleanup.lrange(name, 0, -1))
    finally:
        kombu_fixes._nothing_runs = None  # as in any process that is not a worker's
        kombu_redis.QoS.append = kombu_redis.QoS.append._eventbus_original  # type: ignore[attr-defined]
        cleanup.delete(name, *options.values(), *cleanup.keys(f"{name}:lease:*"))


def _calls(client: redis.Redis) -> dict[str, int]:
    """Commands the server ran so far, by name (``INFO`` itself left out)."""
    stats = client.info("commandstats")
    return {name: int(s["calls"]) for name, s in stats.items() if name != "cmdstat_info"}


def test_a_message_its_pool_process_acknowledged_is_forgotten_here_without_a_command(tmp_path: Path) -> None:
    # A private Redis: its command counts are this test's alone.
    kombu_fixes.apply()
    name = f"kombu-fixes-{uuid.uuid4().hex[:8]}"
    _leases_on_receipt(name)
    try:
        with redis_server(tmp_path) as url:
            client = redis.Redis.from_url(url)
            conn = kombu.Connection(url, transport_options={"global_keyprefix": f"{name}-celery:"})
            queue = conn.SimpleQueue(name)
            # Three messages, each sent with an acknowledgement header the worker never wrote:
            # two get leases on receipt, one does not.
            forged = {kombu_fixes.ACK_HEADER: ["forged-tag", "elsewhere:index", "elsewhere:hash"]}
            queue.put({"n": 0}, headers={name: "0", **forged})
            queue.put({"n": 1}, headers={name: "1", **forged})
            queue.put({"n": 2}, headers=forged)
            acked, failed, unleased = (queue.get(timeout=5) for _ in range(3))

            assert kombu_fixes.ACK_HEADER not in unleased.headers  # dropped, not trusted
            for message in (acked, failed):
                tag, index, unacked = message.headers[kombu_fixes.ACK_HEADER]
                assert tag == message.delivery_tag
                # The keys as they are in Redis, past kombu's global_keyprefix.
                assert (index, unacked) == (f"{name}-celery:unacked_index", f"{name}-celery:unacked")
                assert client.zscore(index, tag) is not None and client.hexists(unacked, tag)

            # What the pool process that ran the first does after its done mark.
            tag, index, unacked = acked.headers[kombu_fixes.ACK_HEADER]
            assert client.zrem(index, tag) == 1 and client.hdel(unacked, tag) == 1
            before = _calls(client)
            kombu_fixes.acknowledged_by_pool(acked)
            acked.ack()
            assert _calls(client) == before  # nothing sent: only forgotten in this process
            # Forgotten here all the same: its prefetch slot is free once kombu flushes it.
            assert acked.acknowledged and acked.delivery_tag in conn.default_channel.qos._dirty

            # Said of messages whose pool process did not acknowledge them (it failed, or it
            # was not offered to): acknowledged as usual, each in Redis.
            kombu_fixes.acknowledged_by_pool(unleased)
            for message in (failed, unleased):
                before = _calls(client)
                message.ack()
                assert _calls(client) != before
                assert not client.hexists(unacked, message.delivery_tag)
                assert client.zscore(index, message.delivery_tag) is None
            assert client.hlen(unacked) == 0 and client.zcard(index) == 0
            queue.close()
            conn.close()
            client.close()
    finally:
        kombu_redis.QoS.append = kombu_redis.QoS.append._eventbus_original  # type: ignore[attr-defined]


_CHILDREN_SCRIPT = """
import os, subprocess, sys, time, types
from celery.concurrency import prefork, solo
from project.kombu_fixes import pool_processes_gone

def worker(pool_cls, state, joined=True):
    pool = pool_cls(1)
    pool._state, pool._pool = state, None if joined else object()
    return types.SimpleNamespace(pool_cls=pool_cls, pool=pool)

stopped, me = worker(prefork.TaskPool, prefork.TaskPool.TERMINATE), os.getpid()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with_child = pool_processes_gone(stopped, me)
child.kill()
while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
zombie = pool_processes_gone(stopped, me)
child.wait()
print(with_child, zombie, pool_processes_gone(stopped, me),
      pool_processes_gone(worker(prefork.TaskPool, prefork.TaskPool.RUN), me),
      pool_processes_gone(worker(prefork.TaskPool, prefork.TaskPool.TERMINATE, joined=False), me),
      pool_processes_gone(stopped, me + 1),
      pool_processes_gone(worker(solo.TaskPool, solo.TaskPool.TERMINATE), me))
"""


def test_pool_processes_count_as_gone_only_once_a_prefork_pool_stopped_and_no_child_lives() -> None:
    # In a process of its own: this test process may have children of its own (servers).
    out = subprocess.run(
        [sys.executable, "-c", _CHILDREN_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    # A stopped prefork pool: with a live child; with a dead one not yet reaped; with none.
    # Then with none, but: a pool still running; one not yet joined; asked from another
    # process than the worker's main one (a pool process inherits the check); a pool that
    # runs tasks in its own process.
    assert out.stdout.split() == ["False", "True", "True", "False", "False", "False", "False"]
