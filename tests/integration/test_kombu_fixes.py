"""kombu's Redis channel, as the worker runs it (project.kombu_fixes applied), against the real Redis."""

from __future__ import annotations

import uuid

import kombu
import pytest

from project import kombu_fixes
from tests.integration.conftest import REDIS_URL

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
