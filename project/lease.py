"""Leases: the one worker process running a delivery holds its lease and renews it.

A lease is a Redis key holding a token of its holder, set when a delivery starts (see
:mod:`project.delivery`, where the same key then holds the delivery's done mark, or
``retrying`` or ``dead``) and renewed every third of its lifetime by one daemon
thread per process, so a handler may run for hours while a crashed holder's lease lapses
within ``DELIVERY_LEASE_S``. A lease only renews while its holder can reach Redis: a holder
cut off for longer than the lease may find, once back, that another copy took over (the
renewal then logs an error, and the exactly-once helpers refuse to commit).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["LEASE_AT_HEADER", "LEASE_HEADER", "LEASE_KEY_HEADER", "LeaseKeeper", "keeper", "new_token"]

log = logging.getLogger("eventbus.lease")

# Extend the lease only while it is still ours.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# A first copy's lease, taken by the worker's main process as it received the message (on a
# Redis broker, in the same transaction as kombu's own note of the message: see
# project.kombu_fixes): its token, and when (time.monotonic(), which the main process and its
# pool processes share). Written into the message's headers in that process only, after
# kombu stored its copy of the message: they are never on the wire nor in a restored copy,
# and the main process drops any that arrive.
LEASE_HEADER = "eventbus_lease"
LEASE_AT_HEADER = "eventbus_lease_at"
# ... and its key, so that the main process can give the lease back if it puts the message
# back unstarted (project.kombu_fixes.release_leases_on_restore).
LEASE_KEY_HEADER = "eventbus_lease_key"

_process: tuple[int, str] = (0, "")  # (pid, "host:pid:") of the process that named it


def new_token() -> str:
    """A token naming this process (host and pid, for operators) and this one hold.

    48 random bits tell one hold from another; the host and pid are looked up once per
    process (a forked child has a pid of its own), not on every handler run.
    """
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, f"{socket.gethostname()}:{pid}:")
    return _process[1] + os.urandom(6).hex()


@dataclass
class _Held:
    client: redis.Redis
    token: str
    ttl_ms: int
    due: float  # time.monotonic() of its next renewal


class LeaseKeeper:
    """Renews the leases this process holds, from one daemon thread started on first use.

    Each lease is renewed a third of its lifetime after it was taken or last renewed, so a
    handler shorter than that never costs a renewal.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_wake = 0.0  # when the thread wakes next (under _lock)

    def hold(self, client: redis.Redis, key: str, token: str, ttl_ms: int, taken_at: float | None = None) -> None:
        """Keep renewing ``key`` (already taken with ``token``) until :meth:`release`.

        ``taken_at``: when it was taken or last renewed (``time.monotonic()``), if not now.
        """
        due = (time.monotonic() if taken_at is None else taken_at) + ttl_ms / 3000
        with self._lock:
            self._held[key] = _Held(client, token, ttl_ms, due)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._renew_forever, name="lease-keeper", daemon=True)
                self._thread.start()
            # The thread sleeps until _next_wake: wake it only for a lease due before that.
            wake = due < self._next_wake
        if wake:
            self._wake.set()

    def adopt(self, client: redis.Redis, key: str, token: str, ttl_ms: int, taken_at: float) -> bool:
        """Hold ``key``, which another process of this host took with ``token`` at ``taken_at``.

        While a third of its lifetime has not passed, that is all: no command. Later, it is
        renewed first, and only if it still holds ``token``; False if it does not (it lapsed,
        and may be another's), and then nothing is held.
        """
        age = time.monotonic() - taken_at
        if not 0 <= age < ttl_ms / 3000:
            if not client.eval(_RENEW_LUA, 1, key, token, ttl_ms):
                return False
            taken_at = time.monotonic()
        self.hold(client, key, token, ttl_ms, taken_at)
        return True

    def token(self, key: str) -> str | None:
        """The token this process holds ``key`` with, if it does."""
        held = self._held.get(key)
        return held.token if held else None

    def release(self, key: str) -> str | None:
        """Stop renewing ``key``; return the token it was held with (the caller overwrites it, or lets it lapse)."""
        with self._lock:
            held = self._held.pop(key, None)
        return held.token if held else None

    def _renew_forever(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [(key, h) for key, h in self._held.items() if h.due <= now]
            for key, h in due:
                try:
                    renewed: Any = h.client.eval(_RENEW_LUA, 1, key, h.token, h.ttl_ms)
                except redis.RedisError as exc:
                    log.warning("lease %s: cannot renew (%s); retrying", key, exc)
                    h.due = time.monotonic() + min(0.5, h.ttl_ms / 3000)
                    continue
                h.due = time.monotonic() + h.ttl_ms / 3000
                if not renewed and key in self._held:
                    log.error("lease %s was lost (it lapsed while this process could not renew it)", key)
            with self._lock:
                # Computed under the lock hold() takes: a lease added from here on compares
                # its due time with this value, and wakes the thread if it is earlier.
                self._next_wake = min((h.due for h in self._held.values()), default=time.monotonic() + 10.0)
                self._wake.clear()
            self._wake.wait(max(0.0, self._next_wake - time.monotonic()))

    def _after_fork(self) -> None:
        # A forked child inherits neither the thread nor the parent's leases.
        self._held = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._next_wake = 0.0


keeper = LeaseKeeper()
os.register_at_fork(after_in_child=keeper._after_fork)
