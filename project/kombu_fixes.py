"""A workaround for a kombu 5.7 Redis transport bug that kills a worker when Redis restarts.

When Redis goes away and the worker's consumer closes its broken connection, kombu's channel
tries to put back the messages this worker held unacknowledged (``QoS.restore_unacked``)
through a connection whose ``client`` is already gone: ``AttributeError: 'NoneType' object has
no attribute 'hostname'`` in ``Channel._connparams``. The error escapes Celery's reconnect
path and the worker's main process exits, or stays up consuming nothing. The messages are
still in kombu's unacked hash in Redis, so nothing is lost by skipping the restore: the
visibility-timeout sweep (``BROKER_RESTORE_INTERVAL_S``) puts them back. This patch does that,
and says so in the log. Found by the fault-injection suite (Redis SIGKILLed and restarted).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["apply"]

log = logging.getLogger("eventbus.kombu_fixes")


def apply() -> None:
    """Patch ``kombu.transport.redis.QoS.restore_unacked`` once (idempotent)."""
    from kombu.transport import redis as kombu_redis

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
