"""The event Redis: one server, or a Redis Cluster, told apart once per process.

``REDIS_URL`` may name any node of a Redis Cluster. ``REDIS_CLUSTER`` unset, the first client
asks the server (``INFO cluster``) and every later one uses the answer; ``REDIS_CLUSTER=true``
or ``false`` skips the question. On a cluster each scope's events get a stream of their own
(``project.keys``), every client is a ``RedisCluster``, and Celery's queues must be on
RabbitMQ (kombu's Redis transport cannot use a cluster, and the router could not send a task
in the script that acknowledges its event).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection

from project.errors import ConfigurationError
from project.keys import Keys
from project.settings import Settings

__all__ = [
    "LuaScript",
    "async_redis_client",
    "cluster_known",
    "is_cluster",
    "keys_for",
    "may_keep_at_hand",
    "redis_client",
    "require_amqp_on_cluster",
    "send_many",
    "send_one",
]

log = logging.getLogger(__name__)

_known: dict[str, bool] = {}
_lock = threading.Lock()


def is_cluster(settings: Settings) -> bool:
    """Whether ``REDIS_URL`` names a Redis Cluster (asked of the server once per process and URL).

    Raises:
        redis.RedisError: the server could not be asked (it is down, or refuses the password).
    """
    if settings.redis_cluster is not None:
        return settings.redis_cluster
    url = settings.redis_url
    known = _known.get(url)
    if known is not None:
        return known
    with _lock:
        if url not in _known:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            try:
                info: Any = client.info("cluster")
            finally:
                client.close()
            _known[url] = bool(int(info.get("cluster_enabled", 0)))
        return _known[url]


def cluster_known(settings: Settings) -> bool:
    """Whether :func:`is_cluster` answers at once, without asking Redis."""
    return settings.redis_cluster is not None or settings.redis_url in _known


def keys_for(settings: Settings) -> Keys:
    """The names of ``settings``' environment, a stream per scope on a cluster."""
    return Keys(settings.events_prefix, cluster=is_cluster(settings))


def redis_client(settings: Settings, **options: Any) -> Any:
    """A synchronous client of the event Redis: ``redis.Redis``, or ``RedisCluster`` on a cluster."""
    if is_cluster(settings):
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def async_redis_client(settings: Settings, **options: Any) -> Any:
    """The asyncio counterpart of :func:`redis_client`."""
    if is_cluster(settings):
        return redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.asyncio.Redis.from_url(settings.redis_url, **options)


def require_amqp_on_cluster(settings: Settings) -> None:
    """Refuse a cluster with Celery's queues in Redis, with the reason.

    Raises:
        ConfigurationError: ``REDIS_URL`` is a cluster and ``CELERY_BROKER_URL`` is not AMQP.
    """
    if is_cluster(settings) and not settings.broker_is_amqp:
        raise ConfigurationError(
            "REDIS_URL names a Redis Cluster: Celery's queues must then be on RabbitMQ "
            "(set CELERY_BROKER_URL to an AMQP URL); kombu's Redis transport cannot use a cluster"
        )


def send_one(client: Any, *args: Any, meanwhile: Callable[[], None] | None = None) -> Any:
    """``client.execute_command(*args)``, on a plain ``redis.Redis`` without its per-call extras.

    What the publish path pays for on every event: redis-py 8 wraps each command in closures,
    a retry call, its own OpenTelemetry timing and a maintenance check, about 8 µs of a
    ``publish_sync`` of 80 here. This sends the command on a connection of the client's pool
    and reads its reply, under the same ``Retry`` (a connection or timeout error
    disconnects, and the command is sent again as redis-py would), and hands the connection
    back. Response callbacks are not applied: the raw reply comes back. A ``RedisCluster``,
    or a client holding one connection, goes through ``execute_command``.

    ``meanwhile``: work for the time Redis takes to answer, called once the command is sent
    (before it, through ``execute_command``), and again if it is sent again. It cannot fail
    the command: an ``Exception`` it raises is logged, and the reply read as usual. Anything
    else (a time limit, ``KeyboardInterrupt``) drops the connection, its reply unread, and
    goes to the caller, as it would from the read.

    Raises:
        redis.RedisError: as ``execute_command`` would (``ResponseError`` for Redis's own
            error reply, ``ConnectionError``/``TimeoutError`` once the retries are spent).
    """
    if type(client) is not redis.Redis or client.connection is not None:
        if meanwhile is not None:
            _do(meanwhile)
        return client.execute_command(*args)
    return _on_pooled_connection(client, lambda conn: _send_read(conn, args, meanwhile))


def _on_pooled_connection(client: redis.Redis, io: Callable[[Any], Any]) -> Any:
    """``io(connection)`` on a connection of ``client``'s pool, under the connection's
    ``Retry`` (a connection or timeout error disconnects, and ``io`` runs again).

    The connection is one kept at hand (:class:`_AtHand`) when the pool allows it.
    """
    pool = client.connection_pool
    at_hand = pool.__dict__.get(_AT_HAND)
    if at_hand is None or at_hand.pid != _pid:
        at_hand = _AtHand.of(pool)
    if at_hand.off:
        conn: Any = pool.get_connection()
    else:
        try:
            conn = at_hand.pop()
        except IndexError:  # none at hand (another thread holds each): the pool checks its own
            conn = pool.get_connection()
        else:
            try:
                _make_ready(conn)
            except BaseException:  # no connection to be had (Redis down), or a time limit: kept, closed
                conn.disconnect()
                at_hand.append(conn)
                raise
    try:
        return conn.retry.call_with_retry(lambda: io(conn), lambda _error: conn.disconnect())
    finally:
        if conn.should_reconnect():  # the server announced maintenance (RESP3 push): as redis-py does
            conn.disconnect()
        if not at_hand.off and len(at_hand) < _MAX_AT_HAND:
            at_hand.append(conn)
        else:
            pool.release(conn)


# The pid this process has, without a system call per command (os.getpid is one).
_pid = os.getpid()


def _forked() -> None:
    global _pid, _at_hand_lock
    _pid = os.getpid()
    _at_hand_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forked)

_AT_HAND = "_eventbus_at_hand"  # the pool's attribute holding its _AtHand
_MAX_AT_HAND = 4  # connections kept at hand per pool; more at once go back to it
_MIN_POOL_SIZE = 32  # a pool limited to fewer connections keeps each one within its own reach
_at_hand_lock = threading.Lock()


class _AtHand(list[Any]):
    """Connections of one pool kept out of it, at hand for :func:`send_one` and :func:`send_many`.

    redis-py 8's ``get_connection`` and ``release`` cost 7 µs a command in a tight loop here
    (its connection-count metrics, an event dispatch, two fork checks, two locks) and about
    13 µs in a publish loop, where each follows a round trip's wait: more than a third of
    what ``publish_sync`` adds to a bare ``PUBLISH``. A connection at hand is checked as the
    pool checks one it hands out (:func:`_make_ready`), for about 1.5 µs.

    Up to ``_MAX_AT_HAND`` wait here (as many threads as send at once, most often one); the
    pool still counts them in use, so a pool limited to fewer than ``_MIN_POOL_SIZE``
    connections keeps none out. Nor does a pool whose release does more than hand a
    connection back, or whose idle connections take pushes: a subclass (blocking,
    Sentinel), one with a client-side cache, one whose credentials are renewed on release,
    or one speaking RESP3 (maintenance notifications and client tracking arrive as pushes
    on idle connections, which the pool keeps and reads). A process forked from this one
    starts with none at hand: the parent's connections are its own.
    """

    __slots__ = ("off", "pid")

    def __init__(self, off: bool) -> None:
        super().__init__()
        self.off = off  # keeps none: each connection comes from the pool and goes back to it
        self.pid = _pid

    @classmethod
    def of(cls, pool: redis.ConnectionPool) -> _AtHand:
        """``pool``'s connections at hand (none yet in a forked child)."""
        with _at_hand_lock:
            at_hand = pool.__dict__.get(_AT_HAND)
            if at_hand is None or at_hand.pid != _pid:
                at_hand = cls(off=not may_keep_at_hand(pool))
                setattr(pool, _AT_HAND, at_hand)
            return at_hand  # type: ignore[no-any-return]


def may_keep_at_hand(pool: Any) -> bool:
    """Whether connections of ``pool`` (sync or asyncio) may be kept out of it between
    commands (see :class:`_AtHand`; the coalescer keeps its own, :mod:`project.coalesce`)."""
    kwargs = getattr(pool, "connection_kwargs", {})
    return (
        type(pool) in (redis.ConnectionPool, redis.asyncio.ConnectionPool)
        and pool.max_connections >= _MIN_POOL_SIZE
        and getattr(pool, "cache", None) is None
        and kwargs.get("credential_provider") is None
        and str(kwargs.get("protocol") or 2) == "2"
    )


def _make_ready(conn: Any) -> None:
    """Make a connection taken from those at hand ready as the pool makes one it hands out:
    connected (under its ``Retry``, as ``get_connection`` connects), and nothing to read.

    One whose socket the server closed (a restart, ``CLIENT KILL``, an idle timeout) reads
    as readable: it is opened again, rather than the command being sent on a dead socket,
    which would cost the call its one attempt. A reply left unread, which no path here
    leaves (each disconnects first), would have it opened again too.

    Raises:
        redis.ConnectionError, redis.TimeoutError: it cannot be connected (nothing was sent).
    """
    if conn.should_reconnect():  # marked while at hand (a maintenance notification): as the pool would
        conn.disconnect()
    if not getattr(conn, "is_connected", False):
        conn.connect()  # a no-op on a connected one, but for its cost
    try:
        if not conn.can_read():
            return
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        pass
    conn.disconnect()
    conn.connect()
    if conn.can_read():
        raise redis.ConnectionError("Connection not ready")


def _send_read(conn: Any, args: tuple[Any, ...], meanwhile: Callable[[], None] | None = None) -> Any:
    conn.send_packed_command(_packed(conn, args))
    if meanwhile is not None:
        try:
            _do(meanwhile)
        except BaseException:
            conn.disconnect()  # its reply is still to come: no later command may read it as its own
            raise
    return conn.read_response()


def _packed(conn: Any, args: tuple[Any, ...]) -> list[bytes]:
    """``args`` in Redis's protocol, as ``conn.pack_command`` makes them.

    With hiredis, redis-py's packer hands the arguments to ``hiredis.pack_command`` after
    splitting the command name at whitespace and copying bytearrays and memoryviews to
    bytes: 1.8 µs of the 2.4 it takes for a publish's EVALSHA. A name that is not one
    alphabetic word, and arguments hiredis does not take, go the packer's way; the rest go
    to hiredis directly, which makes the same bytes.
    """
    if _HiredisPacker is not None and type(getattr(conn, "_command_packer", None)) is _HiredisPacker:
        name = args[0]
        if type(name) is str and name.isalpha():  # one word: nothing for the packer to split
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # a bytearray, a memoryview, or what neither packs: the packer says
                pass
    return list(conn.pack_command(*args))


# redis-py's packer when hiredis is installed (it is a dependency, with redis[hiredis]).
_HiredisPacker: type | None = getattr(redis.connection, "HiredisRespSerializer", None)


def _do(meanwhile: Callable[[], None]) -> None:
    try:
        meanwhile()
    except Exception:
        log.exception("work done while a Redis command was in flight failed; the command goes on")


def send_many(client: Any, *commands: tuple[Any, ...]) -> list[Any]:
    """The raw replies of ``commands``, sent in one round trip: a pipeline without its extras.

    What a worker's done mark pays for on every handler run: redis-py's ``Pipeline`` builds
    its command stack, response callbacks and an ``execute`` closure per use, about 15 µs
    more than this here. The same connection, ``Retry`` and error semantics as a pipeline
    with ``transaction=False``: on a connection error every command is sent again; every
    reply is read before the first error reply is raised, so the connection stays in step.
    A ``RedisCluster``, or a client holding one connection, goes through ``pipeline()``.

    Raises:
        redis.RedisError: the first command's error reply (``ResponseError``), or a
            connection or timeout error once the retries are spent.
    """
    if type(client) is not redis.Redis or client.connection is not None:
        with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute())
    replies: list[Any] = _on_pooled_connection(client, lambda conn: _send_read_many(conn, commands))
    return replies


def _send_read_many(conn: Any, commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
    conn.send_packed_command([b"".join(chunk for command in commands for chunk in _packed(conn, command))])
    replies: list[Any] = []
    error: redis.ResponseError | None = None
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
            error = error or exc
    if error is not None:
        raise error
    return replies


class LuaScript:
    """A Lua script run with EVALSHA; a server that lacks it gets its text once, by EVAL.

    For the scripts a worker runs on every handler run: EVAL would send the text (hundreds
    of bytes) and make Redis hash it on every call. Module-level, so it outlives the client a
    forked process replaces; on a Redis Cluster, EVALSHA goes to the master of its keys.
    """

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()

    def __call__(self, client: Any, keys: list[str], *args: Any) -> Any:
        try:
            return send_one(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a new or flushed Redis (EVAL caches it there)
            return client.eval(self.text, len(keys), *keys, *args)
