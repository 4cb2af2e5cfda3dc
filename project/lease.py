"""Leases: the one worker process running a delivery holds its lease and renews it.

A lease is a Redis key holding a token of its holder, set with ``NX PX`` when a delivery
starts (see :mod:`project.delivery`) and renewed every third of its lifetime by one daemon
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
import uuid
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["LeaseKeeper", "keeper", "new_token"]

log = logging.getLogger("eventbus.lease")

# Extend the lease only while it is still ours.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def new_token() -> str:
    """A token naming this process (host and pid, for operators) and this one hold."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class _Held:
    client: redis.Redis
    token: str
    ttl_ms: int


class LeaseKeeper:
    """Renews the leases this process holds, from one daemon thread started on first use."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, client: redis.Redis, key: str, token: str, ttl_ms: int) -> None:
        """Keep renewing ``key`` (already taken with ``token``) until :meth:`release`."""
        with self._lock:
            self._held[key] = _Held(client, token, ttl_ms)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._renew_forever, name="lease-keeper", daemon=True)
                self._thread.start()
        self._wake.set()

    def token(self, key: str) -> str | None:
        """The token this process holds ``key`` with, if it does."""
        held = self._held.get(key)
        return held.token if held else None

    def release(self, key: str) -> str | None:
        """Stop renewing ``key``; return the token it was held with (the caller deletes it)."""
        with self._lock:
            held = self._held.pop(key, None)
        return held.token if held else None

    def _renew_forever(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            interval_s = min((h.ttl_ms for h in held.values()), default=10_000) / 3000
            for key, h in held.items():
                try:
                    renewed: Any = h.client.eval(_RENEW_LUA, 1, key, h.token, h.ttl_ms)
                except redis.RedisError as exc:
                    log.warning("lease %s: cannot renew (%s); retrying", key, exc)
                    interval_s = min(interval_s, 0.5)
                    continue
                if not renewed and key in self._held:
                    log.error("lease %s was lost (it lapsed while this process could not renew it)", key)
            self._wake.wait(interval_s)
            self._wake.clear()

    def _after_fork(self) -> None:
        # A forked child inherits neither the thread nor the parent's leases.
        self._held = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


keeper = LeaseKeeper()
os.register_at_fork(after_in_child=keeper._after_fork)
