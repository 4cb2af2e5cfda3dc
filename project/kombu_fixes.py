"""Two changes to kombu 5.7's Redis transport: a bug that kills a worker when Redis restarts,
and a client object built for every command the worker's main process sends.

**Redis restarts.**
When Redis goes away and the worker's consumer closes its broken connection, kombu's channel
tries to put back the messages this worker held unacknowledged (``QoS.restore_unacked``)
through a connection whose ``client`` is already gone: ``AttributeError: 'NoneType' object has
no attribute 'hostname'`` in ``Channel._connparams``. The error escapes Celery's reconnect
path and the worker's main process exits, or stays up consuming nothing. The messages are
still in kombu's unacked hash in Redis, so nothing is lost by skipping the restore: the
visibility-timeout sweep (``BROKER_RESTORE_INTERVAL_S``) puts them back. This patch does that,
and says so in the log. Found by the fault-injection suite (Redis SIGKILLed and restarted).

**A client per command.** ``Channel.conn_or_acquire`` makes a new ``redis.Redis`` around the
channel's connection pool for each operation: every task event Celery publishes, and the
unacked bookkeeping of every message received and acknowledged. With redis-py 8 building a
client copies its table of some 200 response callbacks, which was about a fifth of a busy
worker's main process (measured with py-spy). The channel now keeps one client per pool
(redis-py's clients are thread-safe and take a connection from the pool per command); a new
pool, after kombu dropped the old one on a connection error, gets a new client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["apply"]

log = logging.getLogger("eventbus.kombu_fixes")


def apply() -> None:
    """Patch ``QoS.restore_unacked`` and ``Channel.conn_or_acquire`` once (idempotent)."""
    from kombu.transport import redis as kombu_redis

    _reuse_clients(kombu_redis.Channel)

    original: Any = kombu_redis.QoS.restore_unacked
    if getattr(original, "_eventbus_patched", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)
        except AttributeError as exc:
            held = len(self._delivered)
            self._delivered.clear()
            log.warning(
                "kombu could not put back %d unacknowledged messages while closing a broken connection (%s); "
                "they stay in its unacked set and return after the visibility timeout",
                held,
                exc,
            )

    restore_unacked._eventbus_patched = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


def _reuse_clients(channel_class: Any) -> None:
    """Make ``channel_class.conn_or_acquire`` hand out one client per connection pool."""
    if getattr(channel_class.conn_or_acquire, "_eventbus_patched", False):
        return

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        held = self.__dict__.get("_eventbus_client")
        if held is None or held.connection_pool is not pool:
            held = self._create_client()
            self.__dict__["_eventbus_client"] = held
        yield held

    conn_or_acquire._eventbus_patched = True  # type: ignore[attr-defined]
    channel_class.conn_or_acquire = conn_or_acquire
