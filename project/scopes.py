"""On a Redis Cluster, one loop per scope's stream: the router's and the log writer's.

Each scope (``user``, ``cosmic``, ``module``) has its own stream, log buffer and dead-letter
stream in one slot (:mod:`project.keys`). A router or log writer process runs a thread per
scope, each the same consumer-group loop as in one Redis, and looks for the streams of new
scopes every ``SCOPE_REFRESH_S`` (a ``SCAN`` of every master). A scope's group is created
reading from the stream's start, so the events published before a router found the scope
are dispatched too. Every router reads every scope in the same consumer group: more routers
share each scope's entries between them, and one router serves all scopes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis

from project.keys import Keys

__all__ = ["ScopeLoops", "discover_scopes", "literal_scopes", "scope_keys"]

log = logging.getLogger("eventbus.scopes")


class _Loop(Protocol):
    def run(self, stop: threading.Event) -> None: ...


def literal_scopes(patterns: Iterable[str]) -> set[str]:
    """The scopes subscription ``patterns`` name outright (``user`` of ``user.*``; not ``*.x``)."""
    out = set()
    for pattern in patterns:
        first = pattern.split(".", 1)[0]
        if first and not set(first) & {"*", "#"}:
            out.add(first)
    return out


def discover_scopes(client: Any, keys: Keys, suffix: str = "stream") -> set[str]:
    """The scopes whose ``suffix`` key (``stream`` or ``log``) exists on the cluster."""
    found = set()
    for key in client.scan_iter(match=keys.scope_pattern(suffix), count=1000, _type="STREAM"):
        found.add(keys.scope_of_key(key.decode() if isinstance(key, bytes) else str(key), suffix))
    return found


def scope_keys(client: Any, keys: Keys, *suffixes: str) -> list[Keys]:
    """``[keys]`` in one Redis; on a cluster, the keys of every scope, in order, one of whose
    ``suffixes`` keys (``stream``, ``log``, ``dead-letter``; default ``stream``) exists."""
    if not keys.cluster:
        return [keys]
    found: set[str] = set()
    for suffix in suffixes or ("stream",):
        found |= discover_scopes(client, keys, suffix)
    return [keys.of_scope(scope) for scope in sorted(found)]


class ScopeLoops:
    """Runs ``make(scope).run(stop)`` in a thread for every scope found, until ``stop`` is set.

    ``seeds``: scopes to serve from the start (those the subscriptions name), before any of
    their events exist. ``suffix``: the key whose existence reveals a scope (``stream`` for
    the router, ``log`` for the log writer).
    """

    def __init__(
        self,
        what: str,
        client: Any,
        keys: Keys,
        make: Callable[[str], _Loop],
        *,
        refresh_s: float,
        seeds: Iterable[str] = (),
        suffix: str = "stream",
    ) -> None:
        self.what = what
        self.client = client
        self.keys = keys
        self.make = make
        self.refresh_s = refresh_s
        self.seeds = set(seeds)
        self.suffix = suffix
        self.loops: dict[str, _Loop] = {}
        self._threads: dict[str, threading.Thread] = {}

    def run(self, stop: threading.Event) -> None:
        """Start a loop for each scope as it appears; on ``stop``, wait for them to finish."""
        for scope in sorted(self.seeds):
            self._start(scope, stop)
        while not stop.is_set():
            try:
                for scope in sorted(discover_scopes(self.client, self.keys, self.suffix) - set(self.loops)):
                    self._start(scope, stop)
            except redis.RedisError as exc:  # the loops themselves back off; look again later
                log.warning("%s: cannot look for new scopes: %s", self.what, (str(exc).splitlines() or [""])[0])
            stop.wait(self.refresh_s)
        for thread in self._threads.values():
            thread.join(timeout=30)

    def _start(self, scope: str, stop: threading.Event) -> None:
        loop = self.loops[scope] = self.make(scope)
        thread = threading.Thread(target=loop.run, args=(stop,), name=f"{self.what}-{scope}", daemon=True)
        self._threads[scope] = thread
        thread.start()
        log.info("%s: serving scope %r (%s)", self.what, scope, self.keys.of_scope(scope).stream)
