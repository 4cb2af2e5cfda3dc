"""Concurrent ``await publish`` calls on one event loop, sent together in one round trip.

A web application publishes from many requests at once. Each call's script is small, so
what it waits for is the round trip, not Redis. The :class:`Coalescer` of a loop sends a
call made while another is under way with the others made on the same turn of the loop, as
one EVALSHA of the publish script (:data:`project.bus.PUBLISH_LUA`), which stores a batch of
events: N concurrent publishes cost one round trip and one script run instead of N of each.
(A pipeline of N EVALSHA, as this module first sent, still has Redis set up the script N
times and redis-py pack and parse N commands: about as much work as N separate calls, so
100 concurrent publishes were barely faster than 100 concurrent PUBLISH.) The envelopes and
channels of a batch travel in one argument: redis-py packs each argument in Python.

Each call still returns only once Redis holds its own event, and gets its own outcome: the
script stores each event on its own (``redis.pcall``), so one that Redis refuses fails that
call only. A connection that breaks fails every call of that round trip, each of which may
or may not be stored (the caller raises ``PublishOutcomeUnknown`` with its own event_id). A
call that finds nothing under way is sent at once, by its own coroutine: coalescing adds no
wait, no task and no extra round trip to a lone publish.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

__all__ = ["MAX_CALL_BYTES", "MAX_CALL_EVENTS", "Coalescer", "Publish", "script_args"]

#: One event to store: ``(dedup key, envelope JSON, channel)``.
Publish = tuple[str, str, str]

# A batch is cut into script runs of at most this many events and bytes of envelopes (sent
# in one pipeline, still one round trip), so that no single run holds Redis for long.
MAX_CALL_EVENTS = 128
MAX_CALL_BYTES = 1 << 20


def script_args(sha: str, stream: str, window: int, calls: Sequence[Publish]) -> list[Any]:
    """The EVALSHA arguments that store ``calls``: ``KEYS`` the stream then each event's dedup
    key, ``ARGV`` the dedup window then the envelopes and channels, one per line."""
    return [sha, len(calls) + 1, stream, *[c[0] for c in calls], window, "\n".join([p for c in calls for p in c[1:]])]


def _chunks(calls: Sequence[Publish]) -> list[Sequence[Publish]]:
    if len(calls) <= MAX_CALL_EVENTS and sum(len(c[1]) for c in calls) <= MAX_CALL_BYTES:
        return [calls]
    chunks: list[Sequence[Publish]] = []
    start, size = 0, 0
    for i, call in enumerate(calls):
        if i > start and (i - start >= MAX_CALL_EVENTS or size + len(call[1]) > MAX_CALL_BYTES):
            chunks.append(calls[start:i])
            start, size = i, 0
        size += len(call[1])
    chunks.append(calls[start:])
    return chunks


class Coalescer:
    """Sends the publishes of one event loop, coalescing those that arrive together.

    A call that finds nothing under way sends its event at once, by itself. Calls made while
    something is under way queue, and a task sends them together on the loop's next turn
    (so the calls made in one turn go in one round trip), then what queued during that round
    trip in the next one, and so on.
    """

    def __init__(self, client: redis.asyncio.Redis, script: str, stream: str, window: int) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.stream = stream
        self.window = window
        self._pending: list[tuple[Publish, asyncio.Future[Any]]] = []
        self._alone = False  # a call sent by itself is under way
        self._flushing: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference

    async def publish(self, call: Publish) -> Any:
        """Store one event; return its stream id (or the id it was stored under before).

        Raises:
            redis.RedisError: this call's own error, or the round trip's connection error.
        """
        if not self._alone and self._flushing is None:  # nothing under way: sent at once, by this call
            self._alone = True
            try:
                reply = (await self._round_trip([call]))[0]
            finally:
                self._alone = False
            if isinstance(reply, Exception):
                raise reply
            return reply
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:  # what queued during a round trip goes in the next one
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._flushing = None
            # Only if this task was cancelled (the loop closing): nothing of these was sent.
            batch, self._pending = self._pending, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(redis.ConnectionError("publishing stopped: its task was cancelled"))

    async def _send(self, batch: list[tuple[Publish, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip([call for call, _ in batch])
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

    async def _round_trip(self, calls: list[Publish]) -> list[Any]:
        """Store ``calls`` in one round trip: each one's reply, in order, an id or its own
        ``ResponseError``. A lost script is loaded again and the runs it failed sent again.

        Raises:
            redis.RedisError: a connection error, which leaves every call's outcome unknown.
        """
        if len(calls) == 1:  # a call alone: its run is one EVALSHA, with nothing to cut
            chunks: list[Sequence[Publish]] = [calls]
            dedup, envelope, channel = calls[0]
            commands = [[self.sha, 2, self.stream, dedup, self.window, f"{envelope}\n{channel}"]]
        else:
            chunks = _chunks(calls)
            commands = [script_args(self.sha, self.stream, self.window, chunk) for chunk in chunks]
        results = await self._execute(commands)
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
            await self.client.script_load(self.script)  # a new or flushed Redis: load it once
            missing = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
            for i, result in zip(missing, await self._execute([commands[i] for i in missing]), strict=True):
                results[i] = result
        replies: list[Any] = []
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, Exception):  # the whole run refused (out of memory, busy): each of its calls
                replies.extend([result] * len(chunk))
            else:
                replies.extend(result)
        return replies

    async def _execute(self, commands: list[list[Any]]) -> list[Any]:
        """Run the EVALSHA ``commands`` in one round trip; a refused one's reply is its error."""
        if len(commands) == 1:
            try:
                return [await self.client.evalsha(*commands[0])]  # type: ignore[misc]
            except redis.exceptions.ResponseError as exc:  # this run's own error, not the connection's
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.evalsha(*command)
        return list(await pipe.execute(raise_on_error=False))
