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
