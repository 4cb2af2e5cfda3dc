"""Five changes to kombu 5.7's Redis transport: a bug that kills a worker when Redis restarts
(two paths of it), a client object built for every command the worker's main process sends,
a first copy's lease taken in the round trip that receives it, that lease given back when
its message is put back unstarted at a warm shutdown, and a first copy's message
acknowledged by the pool process that ran it.

**Redis restarts.**
When Redis goes away and the worker's consumer closes its broken connection, kombu's channel
tries to put back the messages this worker held unacknowledged (``QoS.restore_unacked``)
through a connection whose ``client`` is already gone: ``AttributeError: 'NoneType' object has
no attribute 'hostname'`` in ``Channel._connparams``. The error escapes Celery's reconnect
path and the worker's main process exits, or stays up consuming nothing. The messages are
still in kombu's unacked hash in Redis, so nothing is lost by skipping the restore: the
visibility-timeout sweep (``BROKER_RESTORE_INTERVAL_S``) puts them back. This patch does that,
and says so in the log. Found by the fault-injection suite (Redis SIGKILLed and restarted).
The same lookup breaks a message's acknowledgement through such a channel, when a pool
process finishes its task after the connection went: that becomes a warning too, and the
message returns after the visibility timeout (:func:`_settle_on_closed_channels`).

**A client per command.** ``Channel.conn_or_acquire`` makes a new ``redis.Redis`` around the
channel's connection pool for each operation: every task event Celery publishes, and the
unacked bookkeeping of every message received and acknowledged. With redis-py 8 building a
client copies its table of some 200 response callbacks, which was about a fifth of a busy
worker's main process (measured with py-spy). The channel now keeps one client per pool
(redis-py's clients are thread-safe and take a connection from the pool per command); a new
pool, after kombu dropped the old one on a connection error, gets a new client.

**A first copy's lease, taken on receipt** (:func:`take_leases_on_receipt`). As the worker's
main process receives a message, kombu notes it as unacknowledged in one transaction
(``QoS.append``). For the router's first copy of a delivery, the ``SET NX`` of its lease goes
into that transaction, and its token into the message's headers
(:data:`~project.lease.LEASE_HEADER`), which the pool process that runs it adopts
(:meth:`~project.lease.LeaseKeeper.adopt`) instead of taking the lease itself: a round trip
fewer in the pool process, on every delivery's way to its handler. The lease is what it
was: the key, the token naming a process of the host that runs the delivery, and its
lifetime, renewed by that pool process.

**Those leases, given back with the messages put back unstarted**
(:func:`release_leases_on_restore`). A worker stopped warm finishes the tasks it runs, and
kombu then puts back the messages it had received but not started (``QoS.restore_unacked``):
with a prefetch of more than one message per process, those are most of what it held. Their
leases were taken on receipt and nothing renews them, so the next worker to receive them
found them held and deferred them until the leases lapsed (``DELIVERY_LEASE_S``): every
restart delayed them that long. Now the main process gives those leases back as it puts the
messages back, where it can tell that no pool process can be running them (its prefork pool
stopped, joined or killed, and no child process alive): each lease is deleted only if it
still holds this process' token.
kombu also puts messages back when a connection breaks, while the pool runs tasks; then
nothing is given back, and the leases lapse as before.

**A first copy acknowledged by its pool process** (:data:`ACK_HEADER`,
:func:`acknowledged_by_pool`). With ``task_acks_late`` the worker's main process
acknowledges each message after its task ran: a transaction removing it from kombu's unacked
set, one more round trip in the process every message of the worker passes through. For a
message whose lease it took on receipt, the main process now tells the pool process the
message's delivery tag and kombu's two unacked keys, and that process removes the message
from them itself, in the round trip that marks its delivery done: the mark, the record and
the acknowledgement go in one pipeline on one connection, in that order, so Redis runs the
acknowledgement after the mark. (A mark Redis refuses, out of memory, does not stop the
acknowledgement after it, as it did not stop the main process' before.) When the task says
it did (``project.delivery.ACKED_BY_POOL``), the main process forgets the message in memory
only. Anything else (a failure, a time limit, a lost process, a copy that did not get that
far) is acknowledged or rejected by the main process as before; removing a message twice
is harmless.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from project.lease import LEASE_AT_HEADER, LEASE_HEADER, LEASE_KEY_HEADER

__all__ = [
    "ACK_HEADER",
    "acknowledged_by_pool",
    "apply",
    "pool_processes_gone",
    "release_leases_on_restore",
    "take_leases_on_receipt",
]

log = logging.getLogger("eventbus.kombu_fixes")


def apply() -> None:
    """Patch ``QoS.restore_unacked``, ``QoS.ack``/``reject`` and ``Channel.conn_or_acquire`` once (idempotent)."""
    from kombu.transport import redis as kombu_redis

    _reuse_clients(kombu_redis.Channel)
    _settle_on_closed_channels(kombu_redis.QoS)
    _forget_what_pools_acknowledged(kombu_redis.QoS)

    original: Any = kombu_redis.QoS.restore_unacked
    if getattr(original, "_eventbus_patched", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        _release_unstarted(self)
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


#: ``(key, token, ttl_ms)`` of the lease to take for a message as it is received, or None.
LeaseOnReceipt = Callable[[Any], "tuple[str, str, int] | None"]

#: The header with which the worker's main process lets a first copy's pool process
#: acknowledge the message itself: ``[delivery tag, unacked index key, unacked hash key]``,
#: the keys as they are in Redis (past kombu's ``global_keyprefix``). Only this module writes
#: it, on receipt, together with the lease's headers.
ACK_HEADER = "eventbus_ack"
# The headers only this module writes on receipt: dropped from a message that came with them.
_OURS = (LEASE_HEADER, LEASE_AT_HEADER, LEASE_KEY_HEADER, ACK_HEADER)
# On a message (its __dict__): set once this process wrote its ACK_HEADER. Only such a
# message may be acknowledged in memory alone.
_OFFERED = "_eventbus_ack_offered"
# On a QoS (its __dict__): the delivery tags its pool processes acknowledged, until Celery's
# ack of each comes (from the event loop, after the task's result).
_ACKED_BY_POOL = "_eventbus_acked_by_pool"


def take_leases_on_receipt(lease_of: LeaseOnReceipt) -> None:
    """Take the lease ``lease_of(message)`` names in the transaction that receives the message.

    The worker's main process calls this once its tasks are registered (the last call
    wins). On success the message's headers get the token, when it was taken, and
    :data:`ACK_HEADER`, and the message is noted as offered to its pool process to
    acknowledge (:func:`acknowledged_by_pool`); headers of those names that came with the
    message are dropped first, whatever ``lease_of`` says: only this process writes them. A
    ``SET`` that fails or errs leaves the message as kombu would: its pool process then
    takes the lease itself, and the main process acknowledges it.
    """
    import redis
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual
    from kombu.utils.json import dumps

    qos: Any = kombu_redis.QoS
    if not all(hasattr(qos, name) for name in ("pipe_or_acquire", "unacked_key", "unacked_index_key")):
        # A kombu whose append is not the one copied below: its pool processes take leases.
        log.warning("kombu's Redis QoS has changed shape; first copies' leases are taken by the pool processes")
        return
    original = getattr(qos.append, "_eventbus_original", qos.append)

    def append(self: Any, message: Any, delivery_tag: Any) -> None:
        headers = message.headers
        if not isinstance(headers, dict):  # none, or malformed: Celery refuses it after this
            return original(self, message, delivery_tag)  # type: ignore[no-any-return]
        for name in _OURS:
            if name in headers:
                del headers[name]
        try:
            lease = lease_of(message)
        except Exception:  # a message kombu would note must still be noted
            log.exception("cannot tell which lease to take for a message received; its pool process will take it")
            lease = None
        if lease is None:
            return original(self, message, delivery_tag)  # type: ignore[no-any-return]
        key, token, ttl_ms = lease
        delivery = message.delivery_info
        # kombu's own append, with the lease's SET NX in its transaction.
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            pipe.hset(self.unacked_key, delivery_tag, raw)
            # Past kombu's global_keyprefix: the lease is the bus's key, not one of kombu's.
            redis.client.Pipeline.execute_command(pipe, "SET", key, token, "NX", "PX", ttl_ms)  # type: ignore[no-untyped-call]
            noted, stored, taken = pipe.execute(raise_on_error=False)
        for reply in (noted, stored):
            if isinstance(reply, Exception):
                raise reply  # what kombu's own append raises
        virtual.QoS.append(self, message, delivery_tag)
        if taken is True:  # None: held or settled already; an error: the pool process will see
            headers[LEASE_HEADER], headers[LEASE_AT_HEADER] = token, time.monotonic()
            headers[LEASE_KEY_HEADER] = key
            prefix = getattr(self.channel, "global_keyprefix", "") or ""
            headers[ACK_HEADER] = [delivery_tag, prefix + self.unacked_index_key, prefix + self.unacked_key]
            message.__dict__[_OFFERED] = True

    append._eventbus_original = original  # type: ignore[attr-defined]
    qos.append = append


# Deletes each lease (KEYS) that still holds its token (ARGV, in the same order); returns how many.
_RELEASE_LUA = """
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
end
return released
"""

# Whether no task of this process can be running now (None: never say so).
_nothing_runs: Callable[[], bool] | None = None


def release_leases_on_restore(nothing_runs: Callable[[], bool]) -> None:
    """Give back the leases taken on receipt when kombu puts their messages back and
    ``nothing_runs()`` says no task of this process can be running (the last call wins).

    The worker's main process calls it as the worker starts (``project.celery_app``), with
    :func:`pool_processes_gone` for its worker and its pid.
    """
    global _nothing_runs
    _nothing_runs = nothing_runs


def pool_processes_gone(worker: Any, main_pid: int) -> bool:
    """Whether no task of ``worker`` (a Celery ``WorkController``) can be running: it runs
    them in pool processes (prefork), its pool has stopped (joined or terminated), this is
    its main process (``main_pid``, not a pool process that inherited the check), and no
    child process of it is alive.

    Another pool runs tasks in this process itself; a pool still running may be forking a
    process that /proc does not show yet; a /proc of another pid namespace cannot tell: all
    are False.
    """
    from celery.concurrency.prefork import TaskPool

    pool = getattr(worker, "pool", None)
    if not isinstance(pool, TaskPool):
        return False
    if pool._state != pool.TERMINATE or pool._pool is not None:  # set once its processes are joined or killed
        return False
    pid = os.getpid()
    if pid != main_pid:
        return False
    try:
        if os.readlink("/proc/self") != str(pid):  # a /proc of another pid namespace
            return False
    except OSError:
        return False
    return _live_children(pid) == 0


def _live_children(pid: int) -> int | None:
    """How many child processes of ``pid`` are alive (a zombie is not), or None if unknown."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    alive = 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            alive += 1
    return alive


def _release_unstarted(qos: Any) -> None:
    """Delete the leases this process took on receipt for the messages ``qos`` is about to
    put back, if no task of this process can be running them; never stands in the restore's way."""
    check = _nothing_runs
    if check is None:
        return
    held: list[tuple[str, str]] = []
    try:
        for message in list(getattr(qos, "_delivered", {}).values()):
            headers = getattr(message, "headers", None)
            if isinstance(headers, dict) and LEASE_KEY_HEADER in headers and LEASE_HEADER in headers:
                held.append((headers[LEASE_KEY_HEADER], headers[LEASE_HEADER]))
        if not held or not check():
            return
        import redis

        with qos.channel.conn_or_acquire() as client:
            keys, tokens = [k for k, _ in held], [t for _, t in held]
            # Past kombu's global_keyprefix: the leases are the bus's keys, not kombu's.
            released = redis.Redis.execute_command(  # type: ignore[no-untyped-call]
                client, "EVAL", _RELEASE_LUA, len(keys), *keys, *tokens
            )
    except Exception as exc:  # the messages still go back; their leases lapse by themselves
        log.warning("could not give back the leases of %d messages put back unstarted (%s)", len(held), exc)
        return
    log.info("gave back the leases of %d of %d messages put back unstarted", released, len(held))


def _settle_on_closed_channels(qos_class: Any) -> None:
    """Make ``ack`` and ``reject`` of a message held by a channel that is closed a warning, not a crash.

    The second path of the restart bug: a pool process finishes a task after the consumer's
    channel lost its connection, and Celery acknowledges the message through that channel.
    kombu looks up its connection pool, rebuilds it from the channel's connection, which is
    gone, and raises ``AttributeError``; Celery only catches connection errors there, so the
    worker's main process ends with ``Unrecoverable error``. The message is still in kombu's
    unacked set: after the visibility timeout it comes back, and the delivery's done (or
    dead) mark has its copy skipped. Only an ``AttributeError`` on a channel that is closed
    (no connection) is caught; any other still raises.
    """
    from kombu.transport import virtual

    for name in ("ack", "reject"):
        original = getattr(qos_class, name)
        if getattr(original, "_eventbus_patched", False):
            continue

        def settle(self: Any, delivery_tag: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            try:
                _original(self, delivery_tag, *args, **kwargs)
            except AttributeError as exc:
                if getattr(self.channel, "connection", None) is not None:
                    raise
                virtual.QoS.ack(self, delivery_tag)  # forget it here; it stays in kombu's unacked set
                log.warning(
                    "cannot %s message %s: its channel is closed (%s); it stays unacknowledged and returns "
                    "after the visibility timeout, when its delivery's mark decides",
                    _original.__name__,
                    delivery_tag,
                    exc,
                )

        settle._eventbus_patched = True  # type: ignore[attr-defined]
        setattr(qos_class, name, settle)


def acknowledged_by_pool(message: Any) -> None:
    """Note that ``message``'s pool process removed it from kombu's unacked set (see
    :data:`ACK_HEADER`): acknowledging it then forgets it in this process alone.

    The worker's main process calls it when the task says so, before Celery acknowledges the
    message (later, from its event loop). A message this process offered no such
    acknowledgement for (no :data:`ACK_HEADER` written on receipt) is acknowledged as usual.
    """
    channel = getattr(message, "channel", None)
    if channel is None or not getattr(message, "__dict__", {}).get(_OFFERED):
        return
    # Kept on the QoS, not looked up in its delivered messages: a connection lost meanwhile
    # clears those, and the ack through the closed channel must still not warn of a message
    # left unacknowledged.
    channel.qos.__dict__.setdefault(_ACKED_BY_POOL, set()).add(message.delivery_tag)


def _forget_what_pools_acknowledged(qos_class: Any) -> None:
    """Make ``ack`` of a message its pool process acknowledged (:func:`acknowledged_by_pool`) a memory-only ack."""
    from kombu.transport import virtual

    original = qos_class.ack
    if getattr(original, "_eventbus_pool_acks", False):
        return

    def ack(self: Any, delivery_tag: Any) -> None:
        acked = self.__dict__.get(_ACKED_BY_POOL)
        if acked and delivery_tag in acked:
            acked.discard(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)  # gone from Redis already: no round trip
            return
        original(self, delivery_tag)

    ack._eventbus_pool_acks = True  # type: ignore[attr-defined]
    # Wrapped around _settle_on_closed_channels' ack: marked as that one is, so that a second
    # apply() does not wrap this one again.
    ack._eventbus_patched = True  # type: ignore[attr-defined]
    qos_class.ack = ack


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
