"""What every explorer page shares: settings, a read-only pool on PostgreSQL, Redis, threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
import sqlalchemy as sa

from project.keys import Keys
from project.redis_conn import keys_for, redis_client
from project.registry import Registry
from project.scopes import scope_keys
from project.settings import Settings

__all__ = ["Explorer"]

T = TypeVar("T")


class Explorer:
    """What every page shares: the settings, a read-only pool on PostgreSQL, Redis, a thread pool.

    Queries run on the pool's threads, so a slow one never stalls the server's loop; the
    connections are read-only, give up on a statement after 15 s, and sort in memory up to
    16 MB (a problems page groups every dead delivery).

    Redis is only read for the dead-letter stream, and only connected to when a page first
    needs it: the explorer serves the record while Redis is down.
    """

    def __init__(self, settings: Settings, *, engine: sa.Engine | None = None, client: redis.Redis | None = None):
        self.settings = settings
        self._keys: Keys | None = None
        self.engine = engine or sa.create_engine(
            settings.database_url,
            pool_size=4,
            max_overflow=4,
            pool_pre_ping=True,
            connect_args={"options": "-c default_transaction_read_only=on -c statement_timeout=15000 -c work_mem=16MB"},
        )
        self._client: Any = client
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="explorer")
        self._registry: Registry | None = None
        self._lock = threading.Lock()

    @property
    def keys(self) -> Keys:
        """The environment's names (a stream per scope on a Redis Cluster).

        Raises:
            redis.RedisError: Redis could not be asked whether it is a cluster.
        """
        with self._lock:
            if self._keys is None:
                self._keys = keys_for(self.settings)
            return self._keys

    @property
    def client(self) -> Any:
        """The event Redis (a ``RedisCluster`` on a cluster), connected on first use.

        Raises:
            redis.RedisError, redis.exceptions.RedisClusterException: Redis does not answer.
        """
        with self._lock:
            if self._client is None:
                self._client = redis_client(self.settings, socket_timeout=5)
            return self._client

    def scope_keys(self, suffix: str = "stream") -> list[Keys]:
        """``[keys]`` in one Redis; on a Redis Cluster, the keys of every scope whose ``suffix``
        stream exists (``stream``, ``log``, ``dead-letter``)."""
        keys = self.keys
        return scope_keys(self.client, keys, suffix) if keys.cluster else [keys]

    def registry(self) -> Registry:
        """The subscriptions (``EVENT_HANDLER_MODULES``), loaded on first use: a redrive needs
        each handler's queue and retry allowance, as ``eventbus redrive`` does."""
        with self._lock:
            if self._registry is None:
                from project.bus import EventBus

                bus = EventBus(self.settings)
                bus.load_modules()
                self._registry = bus.registry
            return self._registry

    async def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    async def read(self, query: Callable[[sa.Connection], T]) -> T:
        """Run ``query`` on a pooled connection, on the thread pool."""

        def work() -> T:
            with self.engine.connect() as conn:
                return query(conn)

        return await self.run(work)

    def close(self) -> None:
        """Stop the thread pool and close the connections."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()
        if self._client is not None:
            self._client.close()
