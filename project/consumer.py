"""One consumer-group loop, which the router and the log writer each configure.

Both read a Redis stream through a consumer group and share the same dance: first the
entries this consumer read in a previous life and never acknowledged, then, now and then,
entries another consumer left pending for too long (it is presumed dead: XAUTOCLAIM), then
block for new ones; back off on errors and survive anything. What differs is what a batch
is handed to, the periodic chores (the router trims its stream, the log writer reports
shed records), and whether to let a batch build up after a partial one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.cluster

__all__ = ["ConsumerConfig", "GroupConsumer", "ensure_group"]

Entries = Sequence[tuple[Any, Any]]

# A consumer that owns nothing and has been silent this long is gone for good.
_DEPARTED_IDLE_MS = 24 * 3600 * 1000


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` reading from its start (so nothing published earlier is missed)."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass(frozen=True)
class ConsumerConfig:
    """How one consumer reads its stream.

    ``claim_idle_ms``: an entry pending this long on another consumer is taken over.
    ``linger_ms``: after a partial batch, wait this long for more (fewer, larger batches).
    ``chores``: ``(interval_s, callable)`` run between batches, each at most that often.
    """

    what: str  # for the logs: "router", "log writer"
    stream: str
    group: str
    consumer: str
    batch_size: int
    block_ms: int
    claim_idle_ms: int
    backoff_max_s: float
    backoff_start_s: float = 0.1
    linger_ms: int = 0
    chores: tuple[tuple[float, Callable[[], object]], ...] = field(default_factory=tuple)


class GroupConsumer:
    """Runs the loop of :class:`ConsumerConfig` and hands every batch to ``handle``.

    ``handle`` must acknowledge what it finished; an entry it leaves pending is read again
    (by this consumer after an error, or by another one after ``claim_idle_ms``).
    ``is_outage`` tells an expected outage (logged as a warning) from a bug (logged with its
    traceback); either way the loop backs off and goes on.
    """

    def __init__(
        self,
        client: redis.Redis,
        config: ConsumerConfig,
        handle: Callable[[Entries], object],
        *,
        is_outage: Callable[[BaseException], bool] = lambda exc: isinstance(exc, redis.RedisError),
    ) -> None:
        self.client = client
        self.config = config
        self.handle = handle
        self.is_outage = is_outage
        self.errors = 0
        self.log = logging.getLogger(f"eventbus.{config.what.replace(' ', '_')}")
        self._claim_cursor = "0-0"
        # Whether the batch being handled was read new (">"), rather than read again from
        # this consumer's pending entries or taken over from another consumer's.
        self.fresh = True
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._next_claim_at = 0.0
        self._chores_due = [0.0] * len(config.chores)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set. Survives outages and any bad entry."""
        c = self.config
        backoff_s = c.backoff_start_s
        read_pending = True  # first our own pending entries, from a previous life
        while not stop.is_set():
            try:
                ensure_group(self.client, c.stream, c.group)
                while not stop.is_set():
                    self._do_chores()
                    if time.monotonic() >= self._next_claim_at:
                        self.claim_abandoned()
                    if read_pending:
                        read_pending = self.read_once("0", block_ms=None) > 0
                        continue
                    n = self.read_once(">", block_ms=c.block_ms)
                    if 0 < n < c.batch_size and c.linger_ms:
                        stop.wait(c.linger_ms / 1000)
                    backoff_s = c.backoff_start_s
                return
            except Exception as exc:
                if self.is_outage(exc):
                    first = (str(exc).splitlines() or [""])[0]
                    self.log.warning("%s: %s; retrying in %.1fs", c.what, first, backoff_s)
                else:  # a bug must not end the process; the batch stays pending
                    self.log.exception("%s: unexpected error; retrying in %.1fs", c.what, backoff_s)
            self.errors += 1
            read_pending = True
            stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, c.backoff_max_s)

    def read_once(self, start: str, block_ms: int | None) -> int:
        """Read one batch (``"0"``: own pending; ``">"``: new), hand it over; return its size."""
        c = self.config
        if self._cluster:
            # Sent to the stream's master directly: RedisCluster would otherwise ask a node
            # COMMAND GETKEYS twice per read to find XREADGROUP's key (two more round trips).
            block = [] if block_ms is None else ["BLOCK", block_ms]
            args = ["XREADGROUP", "GROUP", c.group, c.consumer, "COUNT", c.batch_size, *block]
            cluster: Any = self.client
            reply: Any = cluster.execute_command(
                *args, "STREAMS", c.stream, start, target_nodes=cluster.get_node_from_key(c.stream)
            )
        else:
            reply = self.client.xreadgroup(c.group, c.consumer, {c.stream: start}, count=c.batch_size, block=block_ms)
        entries = reply[0][1] if reply else []
        if entries:
            self.fresh = start == ">"
            self.handle(entries)
        return len(entries)

    def claim_abandoned(self) -> None:
        """Take over entries pending too long on a consumer presumed dead, one batch per call."""
        c = self.config
        claimed: Any = self.client.xautoclaim(
            c.stream, c.group, c.consumer, c.claim_idle_ms, start_id=self._claim_cursor, count=c.batch_size
        )
        cursor, entries, *deleted = claimed
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if deleted and deleted[0]:
            self.log.error(
                "%s: %d pending entries had been deleted from %s before they were handled: %s",
                c.what, len(deleted[0]), c.stream, deleted[0][:10],
            )  # fmt: skip
        if entries:
            self.log.info("%s: took over %d entries abandoned by another consumer", c.what, len(entries))
            self.fresh = False
            self.handle(entries)
        if self._claim_cursor == "0-0":  # a full sweep: rest until entries could be idle again
            self._next_claim_at = time.monotonic() + c.claim_idle_ms / 2000
            self.forget_departed()

    def forget_departed(self) -> None:
        """Remove consumers that own nothing and have been silent for a day.

        Every process start adds a consumer (host-pid) to the group; the departed would only
        clutter XINFO.
        """
        c = self.config
        consumers: Any = self.client.xinfo_consumers(c.stream, c.group)
        for info in consumers:
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            if name != c.consumer and not info["pending"] and info["idle"] > _DEPARTED_IDLE_MS:
                self.client.xgroup_delconsumer(c.stream, c.group, name)

    def _do_chores(self) -> None:
        now = time.monotonic()
        for i, (interval_s, chore) in enumerate(self.config.chores):
            if now >= self._chores_due[i]:
                self._chores_due[i] = now + interval_s
                chore()
