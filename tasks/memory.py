"""Active working memory: a per-user cache in Redis, invalidated by events.

Every user's entry is keyed under a global generation number, so a global event
invalidates every user in O(1) by incrementing the generation; the stale keys simply
expire with their TTL. A user-level event deletes that user's current key.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis

from tasks.keys import AppKeys

__all__ = ["ActiveMemory"]


class ActiveMemory:
    """Read, fill and invalidate the per-user working memory."""

    def __init__(self, client: redis.Redis, keys: AppKeys, ttl_s: int = 3600) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def generation(self) -> int:
        """The current generation (0 before the first global invalidation)."""
        return int(self.client.get(self.keys.memory_generation) or 0)

    def get(self, user_id: str) -> dict[str, str]:
        """The user's cached fields, or an empty dict."""
        raw: dict[bytes, bytes] = self.client.hgetall(self.keys.memory_user(self.generation(), user_id))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def put(self, user_id: str, fields: Mapping[str, str]) -> None:
        """Cache ``fields`` for the user, with the TTL."""
        key = self.keys.memory_user(self.generation(), user_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=dict(fields))  # type: ignore[arg-type]
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def invalidate_user(self, user_id: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Forget what is cached for one user; queued on ``pipe`` (a MULTI) when given."""
        # The generation is read now, outside any MULTI: if it moves on before the DEL runs,
        # the key deleted is already stale, which is just as good.
        (pipe if pipe is not None else self.client).delete(self.keys.memory_user(self.generation(), user_id))

    def invalidate_all(self, pipe: redis.client.Pipeline | None = None) -> None:
        """Forget what is cached for every user, in O(1); queued on ``pipe`` (a MULTI) when given."""
        (pipe if pipe is not None else self.client).incr(self.keys.memory_generation)
