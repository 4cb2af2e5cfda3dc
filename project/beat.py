"""A beat scheduler that schedules only while it holds a lock in Redis.

Two beat processes started by mistake would each send every periodic task. Rather than
make each task deduplicate itself, only the beat that holds ``<prefix>:beat:leader`` sends;
the others tick idle and take over when the holder stops renewing (after
``BEAT_LOCK_TTL_S``). A lock in front of the stock in-memory scheduler was chosen over a
Redis-backed schedule store because it needs no third-party scheduler and keeps beat's own
due-time logic. A takeover can run a periodic task twice (the old leader sent it just before
its lock lapsed), so the application's periodic tasks must be idempotent.

The lock is one key under the environment's own prefix, also on a Redis Cluster; the client
is made on the first tick, so a beat started before Redis stands by until it answers.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from celery.beat import Scheduler

from project.redis_conn import keys_for, redis_client
from project.settings import get_settings

__all__ = ["LeaderScheduler"]

log = logging.getLogger("eventbus.beat")

# Take the lock if it is free, or extend it if it is ours; atomically.
_HOLD_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


class LeaderScheduler(Scheduler):  # type: ignore[misc]
    """Celery's in-memory scheduler, active only in the one beat that holds the lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        self._settings = settings
        self._lock_key = ""
        self._lock_ttl_ms = int(settings.beat_lock_ttl_s * 1000)
        self._token = uuid.uuid4().hex
        self._client: Any = None
        self._hold: Any = None
        self._leading: bool | None = None  # unknown until the first tick
        super().__init__(*args, **kwargs)
        # Renew well within the TTL, however long the next task is away.
        self.max_interval: float = min(float(self.max_interval), settings.beat_lock_ttl_s / 3)

    def _connect(self) -> None:
        # keys_for asks Redis whether it is a cluster, and a cluster client connects: both wait
        # for the first tick, where an outage means standing by.
        if self._client is None:
            self._lock_key = keys_for(self._settings).beat_lock
            self._client = redis_client(self._settings)
            self._hold = self._client.register_script(_HOLD_LUA)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            self._connect()
            leading = bool(self._hold(keys=[self._lock_key], args=[self._token, self._lock_ttl_ms]))
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            log.warning("beat: cannot reach Redis for the leader lock (%s); not scheduling", exc)
            leading = False
        if leading != self._leading:
            log.info("beat: %s", "now scheduling (holds the leader lock)" if leading else "standing by")
            self._leading = leading
        if not leading:
            return float(self.max_interval)
        return float(super().tick(*args, **kwargs))

    def close(self) -> None:
        if self._leading:  # hand over at once instead of after the TTL
            self._client.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                1, self._lock_key, self._token,
            )  # fmt: skip
        super().close()
