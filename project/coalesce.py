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

Calls made on one turn of the loop (``asyncio.gather`` of many publishes) do not all wait for
the turn to end: every :data:`EARLY_SEND_EVENTS` queued calls are written to Redis by the
call that completes them, and a task reads their reply, so Redis stores those while the
loop's other calls are still building their envelopes. On a plain ``redis.asyncio.Redis``
the coalescer writes on a connection of the client's pool itself: redis-py's own write
(``send_packed_command``) runs in a task of its own whenever the client has a socket
timeout, which redis-py 8 sets by default, so it would wait for the turn to end. A
connection error on that path fails the round trip's calls as one through the client would,
or, where the client's ``Retry`` allows it, sends them again through the client (the script
stores an event once). A call cancelled while it writes a batch leaves the batch's other
calls to be sent the usual way.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio

from project.redis_conn import may_keep_at_hand

__all__ = ["EARLY_SEND_EVENTS", "MAX_CALL_BYTES", "MAX_CALL_EVENTS", "Coalescer", "Publish", "script_args"]

#: One event to store: ``(dedup key, envelope JSON, channel)``.
Publish = tuple[str, str, str]

# A batch is cut into script runs of at most this many events and bytes of envelopes (sent
# in one pipeline, still one round trip), so that no single run holds Redis for long.
MAX_CALL_EVENTS = 128
MAX_CALL_BYTES = 1 << 20
#: Queued calls are written by the call that makes them this many, not on the loop's next turn.
EARLY_SEND_EVENTS = 32
# Over this many bytes waiting in a connection's write buffer, a write waits for Redis to read.
_WRITE_BUFFER_LIMIT = 1 << 16
# Connections of the client's pool kept at hand between round trips (Coalescer._connection).
_MAX_AT_HAND = 2
# What the client's Retry would retry: on the direct path, a reason to send again through it.
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, socket.timeout, OSError)

Batch = list[tuple[Publish, "asyncio.Future[Any]"]]


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
    trip in the next one, and so on. Every :data:`EARLY_SEND_EVENTS` calls queued on one
    turn are written at once by the call that completes them.
    """

    def __init__(self, client: redis.asyncio.Redis, script: str, stream: str, window: int) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.stream = stream
        self.window = window
        self._pending: Batch = []
        self._alone = False  # a call sent by itself is under way
        self._flushing: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference
        self._early: set[asyncio.Task[None]] = set()  # reading the replies of batches written early
        # Round trips a caller runs itself (a call alone; the write of an early batch), each
        # as a future done when it ends: what wait() waits for besides the tasks.
        self._in_calls: set[asyncio.Future[None]] = set()
        # Writes on a connection of the pool itself: not with a cluster client (a pool per
        # node) or a client that holds one connection of its own.
        self._direct = type(client) is redis.asyncio.Redis and client.connection is None
        # Connections of that pool kept at hand between round trips (see _connection).
        self._keeps = self._direct and may_keep_at_hand(client.connection_pool)
        self._at_hand: list[Any] = []

    async def publish(self, call: Publish) -> Any:
        """Store one event; return its stream id (or the id it was stored under before).

        Raises:
            redis.RedisError: this call's own error, or the round trip's connection error.
        """
        if not self._alone and self._flushing is None and not self._early:  # nothing under way: sent at once
            self._alone = True
            ending = self._begin()
            try:
                reply = (await self._round_trip([call]))[0]
            finally:
                self._alone = False
                self._end(ending)
            if isinstance(reply, Exception):
                raise reply
            return reply
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        elif len(self._pending) >= EARLY_SEND_EVENTS and self._direct:
            batch, self._pending = self._pending, []
            await self._send_early(batch, future)
        return await future

    async def wait(self) -> None:
        """Wait until every publish under way has its outcome (before the client is closed)."""
        # asyncio.wait, not gather: a wait that is cancelled must not cancel the publishes.
        while under_way := [f for f in (self._flushing, *self._early, *self._in_calls) if f is not None]:
            await asyncio.wait(under_way)

    def _begin(self) -> asyncio.Future[None]:
        ending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_calls.add(ending)
        return ending

    def _end(self, ending: asyncio.Future[None]) -> None:
        self._in_calls.discard(ending)
        if not ending.done():
            ending.set_result(None)

    async def _flush(self) -> None:
        try:
            while self._pending:  # what queued during a round trip goes in the next one
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._flushing = None
            # Only if this task was cancelled (the loop closing): nothing of these was sent.
            batch, self._pending = self._pending, []
            _fail(batch, redis.ConnectionError("publishing stopped: its task was cancelled"))

    async def _send(self, batch: Batch) -> None:
        await self._settle(batch, self._round_trip([call for call, _ in batch]))

    async def _send_early(self, batch: Batch, own: asyncio.Future[Any]) -> None:
        """Write ``batch`` (which ends with this call's ``own``) now; a task reads the reply.

        Getting a connection and writing on it do not wait (a connected client, room in the
        socket buffer), so the write happens on this turn of the loop. If this call is
        cancelled while they wait (a new connection), the other calls go the usual way.
        """
        chunks, commands = self._commands([call for call, _ in batch])
        ending = self._begin()
        try:
            conn = await self._write(commands)
        except Exception as exc:  # no connection to be had (Redis down, a refused password): all of them
            self._end(ending)
            _fail(batch, exc)
            return
        except BaseException:  # this call was cancelled (sending the rest again is safe: dedup keys)
            self._pending[:0] = [item for item in batch if item[1] is not own]
            if self._flushing is None and self._pending:
                self._flushing = asyncio.get_running_loop().create_task(self._flush())
            self._end(ending)
            raise
        task = asyncio.get_running_loop().create_task(self._settle(batch, self._replies(chunks, commands, conn)))
        self._early.add(task)
        self._end(ending)  # only once the task is known: wait() always sees one of the two

        def done(task: asyncio.Task[None]) -> None:
            self._early.discard(task)
            if task.cancelled():  # possibly before it started (the loop closing): it settled nothing
                _fail(batch, redis.ConnectionError("publishing stopped: its task was cancelled"))

        task.add_done_callback(done)

    @staticmethod
    async def _settle(batch: Batch, replies: Any) -> None:
        """Await ``replies`` (a coroutine) and give each call of ``batch`` its own outcome."""
        try:
            outcomes = await replies
        except BaseException as exc:  # the connection broke (or the task was cancelled): all of them
            _fail(batch, exc if isinstance(exc, Exception) else redis.ConnectionError(f"publishing stopped ({exc!r})"))
            if not isinstance(exc, Exception):
                raise
            return
        if len(outcomes) != len(batch):  # not from PUBLISH_LUA; still, never leave a caller waiting
            _fail(batch, redis.exceptions.InvalidResponse(f"{len(outcomes)} replies to {len(batch)} publishes"))
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _round_trip(self, calls: list[Publish]) -> list[Any]:
        """Store ``calls`` in one round trip: each one's reply, in order, an id or its own
        ``ResponseError``.

        Raises:
            redis.RedisError: a connection error, which leaves every call's outcome unknown.
        """
        chunks, commands = self._commands(calls)
        return await self._replies(chunks, commands, await self._write(commands))

    def _commands(self, calls: list[Publish]) -> tuple[list[Sequence[Publish]], list[list[Any]]]:
        """The script runs that store ``calls``: ``(chunks, EVALSHA arguments of each)``."""
        if len(calls) == 1:  # a call alone: its run is one EVALSHA, with nothing to cut
            dedup, envelope, channel = calls[0]
            return [calls], [[self.sha, 2, self.stream, dedup, self.window, f"{envelope}\n{channel}"]]
        chunks = _chunks(calls)
        return chunks, [script_args(self.sha, self.stream, self.window, chunk) for chunk in chunks]

    async def _write(self, commands: list[list[Any]]) -> Any:
        """Write the EVALSHA ``commands`` on a connection of the pool; the connection, or None
        where they are to go through the client instead (a cluster client, or a write that
        failed and may be sent again).

        Raises:
            redis.RedisError: no connection could be made (nothing was written).
        """
        if not self._direct:
            return None
        pool: Any = self.client.connection_pool
        conn = await self._connection(pool)
        try:
            packed = _pack(commands, conn)
            writer = getattr(conn, "_writer", None)
            if writer is None:  # another connection class: its own (possibly waiting) write
                await conn.send_packed_command(packed)
            else:
                writer.writelines(packed)
                if writer.transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT:
                    await asyncio.wait_for(writer.drain(), conn.socket_timeout)
        except _RETRYABLE as exc:  # asyncio.TimeoutError is TimeoutError, an OSError
            await _drop(pool, conn)
            if not _retries(conn):
                if isinstance(exc, redis.RedisError):
                    raise
                raise _as_redis_error(exc) from exc
            return None
        except BaseException:
            await _drop(pool, conn)
            raise
        return conn

    async def _replies(self, chunks: list[Sequence[Publish]], commands: list[list[Any]], conn: Any) -> list[Any]:
        """Each call's reply: read from ``conn`` (commands written by :meth:`_write`), or, with no
        connection or a broken one, from the commands sent again through the client. A lost
        script is loaded again and the runs it failed sent again."""
        results: list[Any] | None = None
        if conn is not None:
            try:
                results = await self._read(conn, len(commands))
            except _RETRYABLE as exc:  # the connection broke (it is closed): sent again below, if retries are on
                if not _retries(conn):
                    if isinstance(exc, redis.RedisError):
                        raise
                    raise _as_redis_error(exc) from exc
                results = None
        if results is None:
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

    async def _read(self, conn: Any, count: int) -> list[Any]:
        """The replies of ``count`` commands written on ``conn``, which goes back to the pool.

        A refused run's reply is its error.
        """
        results: list[Any] = []
        try:
            for _ in range(count):
                try:
                    results.append(await conn.read_response())
                except redis.exceptions.ResponseError as exc:  # that run's own error, not the connection's
                    results.append(exc)
        except BaseException:
            await _close_now(conn)
            raise
        finally:
            await self._give_back(conn)
        return results

    async def _connection(self, pool: Any) -> Any:
        """A connected connection of ``pool``: one kept at hand, or the pool's own.

        redis-py 8's ``get_connection`` and ``release`` cost 9 µs a round trip here (its
        connection-count metrics, an event dispatch, its lock taken twice), as much as the
        rest of a lone ``await publish``. One kept at hand is checked as the pool checks
        those it hands out (connected, nothing to read: a socket the server closed is opened
        again), and the pool still counts it in use (which pools keep none out:
        :func:`project.redis_conn.may_keep_at_hand`).
        """
        if self._at_hand:
            conn = self._at_hand.pop()
            try:
                if conn.should_reconnect():  # marked while at hand (a maintenance notification)
                    await conn.disconnect()
                await pool.ensure_connection(conn)  # connects under the client's Retry
            except BaseException:
                await pool.release(conn)
                raise
            return conn
        return await pool.get_connection()  # connects under the client's Retry already

    async def _give_back(self, conn: Any) -> None:
        """Keep ``conn`` at hand for the next round trip, or hand it back to its pool."""
        if self._keeps and len(self._at_hand) < _MAX_AT_HAND:
            self._at_hand.append(conn)  # one marked for reconnection is reconnected when taken
        else:
            await self.client.connection_pool.release(conn)

    async def _execute(self, commands: list[list[Any]]) -> list[Any]:
        """Run the EVALSHA ``commands`` in one round trip through the client (and its retry);
        a refused one's reply is its error."""
        if len(commands) == 1:
            try:
                return [await self.client.evalsha(*commands[0])]  # type: ignore[misc]
            except redis.exceptions.ResponseError as exc:  # this run's own error, not the connection's
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.evalsha(*command)
        return list(await pipe.execute(raise_on_error=False))


def _pack(commands: list[list[Any]], conn: Any) -> list[bytes]:
    """EVALSHA ``commands`` in Redis's protocol, as ``conn.pack_commands`` would make them.

    Their arguments are the script's SHA, key names, envelopes and integers: packed here by
    ``hiredis.pack_command`` (which writes ``str`` as UTF-8) at a quarter of redis-py's cost
    when they are all ``str`` and ``int`` and the client encodes as strict UTF-8 (its
    default), by redis-py otherwise.
    """
    encoder = conn.encoder
    if (
        encoder.encoding.lower().replace("_", "-") not in ("utf-8", "utf8")
        or encoder.encoding_errors != "strict"
        or any(type(a) is not str and type(a) is not int for command in commands for a in command)
    ):
        return list(conn.pack_commands([["EVALSHA", *command] for command in commands]))
    return [hiredis.pack_command(("EVALSHA", *command)) for command in commands]


async def _drop(pool: Any, conn: Any) -> None:
    """Close ``conn`` (something of a command may be on it) and hand it back to ``pool``."""
    try:
        await _close_now(conn)
    finally:
        await pool.release(conn)


async def _close_now(conn: Any) -> None:
    """Close ``conn`` at once, dropping what waits in its write buffer.

    A plain close would first write out the rest of a batch Redis stopped reading (a
    stalled server): the transport would stay open, holding the batch, until Redis read it
    all or the loop closed. Those calls have failed with an unknown outcome already.
    """
    writer = getattr(conn, "_writer", None)
    if writer is not None:
        writer.transport.abort()
    await conn.disconnect(nowait=True)


def _as_redis_error(exc: OSError) -> redis.RedisError:
    """A socket's own error (a wait for Redis to read that timed out, a reset) as redis-py
    raises a broken write or read: its ``TimeoutError`` or ``ConnectionError``, which the
    bus reports as an unknown outcome."""
    if isinstance(exc, TimeoutError):
        return redis.TimeoutError(f"Redis did not take the write in time ({exc!r})")
    return redis.ConnectionError(f"the connection to Redis broke ({exc!r})")


def _retries(conn: Any) -> bool:
    """Whether the client's Retry sends a command again after a connection error."""
    retry = getattr(conn, "retry", None)
    return retry is not None and retry.get_retries() != 0


def _fail(batch: Batch, exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
