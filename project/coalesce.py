"""Concurrent ``await publish`` calls on one event loop, sent together in one round trip.

A web application publishes from many requests at once. Each call's script is small, so
what it waits for is the round trip, not Redis. The :class:`Coalescer` of a loop queues the
calls that arrive while one round trip is under way and sends them all in the next one, as
one pipeline: under load, N concurrent publishes cost about one round trip instead of N.

Each call still returns only once Redis holds its own event, and gets its own outcome: a
script that fails for one event (Redis refusing it) fails that call only. A connection that
breaks fails every call of that round trip, each of which may or may not be stored (the
caller raises ``PublishOutcomeUnknown`` with its own event_id). A call alone is sent at
once, as a plain EVALSHA: coalescing adds no wait and no extra round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

__all__ = ["Coalescer"]


class Coalescer:
    """Sends the EVALSHA calls of one event loop, coalescing those that arrive together."""

    def __init__(self, client: redis.asyncio.Redis, script: str) -> None:
        self.client = client
        self.script = script
        self._pending: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def evalsha(self, args: Sequence[Any]) -> Any:
        """Run ``EVALSHA *args`` (loading the script if Redis lost it) and return its reply.

        Raises:
            redis.RedisError: this call's own error, or the round trip's connection error.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            # Calls that arrive while a round trip is under way wait for the next one.
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._flushing = None

    async def _send(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip([args for args, _ in batch])
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                await self.client.script_load(self.script)  # a new or flushed Redis: load it once
                missing = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
                again = await self._round_trip([batch[i][0] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:  # the connection broke (or the flush was cancelled): all of them
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else redis.ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, calls: list[Sequence[Any]]) -> list[Any]:
        if len(calls) == 1:
            try:
                return [await self.client.evalsha(*calls[0])]  # type: ignore[misc]
            except redis.exceptions.ResponseError as exc:  # this call's own error, not the connection's
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(*args)
        return list(await pipe.execute(raise_on_error=False))
