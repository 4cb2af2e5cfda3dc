"""Gauges read from Redis when Prometheus scrapes: the router's lag, the log buffer, the
dead-letter, rejected-tasks and set-aside streams.

They describe shared state, not the process, so they are computed at scrape time (a few
O(1) or O(log n) commands) instead of being kept up to date on the dispatch path. Every
router and log writer that serves metrics reports the same values; take ``max`` across them.

On a Redis Cluster each scope has its own stream, dead-letter stream and log buffer: the
counts are summed over the scopes and the ages are the oldest of any scope. The scopes are
found by a ``SCAN`` of every master, at most once every ``refresh_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from project.keys import ROUTER_GROUP, Keys
from project.scopes import scope_keys

__all__ = ["LogBufferGauges", "RouterGauges"]

log = logging.getLogger("eventbus.metrics")


def _age_s(entry_id: Any, now_ms: int) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return max(now_ms - int(text.split("-", 1)[0]), 0) / 1000


def _oldest_age_s(client: redis.Redis, stream: str, group: str, now_ms: int) -> float:
    """Age of the oldest entry ``group`` has not acknowledged: pending, or else not yet read."""
    groups: Any = client.xinfo_groups(stream)
    info = next((g for g in groups if _text(g["name"]) == group), None)
    if info is None:  # nobody has read the stream yet: everything in it is waiting
        first: Any = client.xrange(stream, count=1)
        return _age_s(first[0][0], now_ms) if first else 0.0
    if info["pending"]:
        summary: Any = client.xpending(stream, group)
        return _age_s(summary["min"], now_ms)
    if info.get("lag"):
        after: Any = client.xrange(stream, min=f"({_text(info['last-delivered-id'])}", count=1)
        return _age_s(after[0][0], now_ms) if after else 0.0
    return 0.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _group_counts(client: redis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(entries not yet read by ``group``, entries read but not acknowledged)."""
    if not client.exists(stream):
        return 0, 0
    groups: Any = client.xinfo_groups(stream)
    info = next((g for g in groups if _text(g["name"]) == group), None)
    if info is None:
        return int(client.xlen(stream)), 0
    # lag is None when Redis cannot tell (entries deleted past the last-read id); XLEN bounds it.
    lag = info.get("lag")
    return (int(client.xlen(stream)) if lag is None else int(lag)), int(info["pending"])


class _RedisGauges(Collector):
    #: The key whose existence reveals a scope on a cluster (``project.scopes``).
    scope_key = "stream"

    def __init__(self, client: Any, keys: Keys, *, refresh_s: float = 2.0) -> None:
        self.client = client
        self.keys = keys
        self.refresh_s = refresh_s
        self._scopes: list[Keys] = [keys]
        self._found_at = float("-inf")

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect(int(time.time() * 1000)))
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            # a scrape must not fail the process, nor hang on it
            log.warning("metrics: cannot read Redis for the %s gauges: %s", type(self).__name__, exc)
            return []

    def scopes(self) -> list[Keys]:
        """The keys of every scope: ``[keys]`` in one Redis, each scope's on a cluster."""
        if not self.keys.cluster:
            return [self.keys]
        if time.monotonic() - self._found_at >= self.refresh_s:
            self._scopes = scope_keys(self.client, self.keys, self.scope_key)
            self._found_at = time.monotonic()
        return self._scopes

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        raise NotImplementedError

    @staticmethod
    def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)


class RouterGauges(_RedisGauges):
    """The event stream as the routers see it, and the dead-letter stream."""

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        lag, pending, age, dead = 0, 0, 0.0, 0
        for keys in self.scopes():
            scope_lag, scope_pending = _group_counts(self.client, keys.stream, ROUTER_GROUP)
            lag, pending = lag + scope_lag, pending + scope_pending
            if scope_lag or scope_pending:
                age = max(age, _oldest_age_s(self.client, keys.stream, ROUTER_GROUP, now_ms))
            dead += int(self.client.xlen(keys.dead_letter))
        yield self._gauge("eventbus_router_lag_entries", "Stream entries no router has read yet.", lag)
        yield self._gauge(
            "eventbus_router_pending_entries", "Stream entries read by a router, not yet acknowledged.", pending
        )
        yield self._gauge(
            "eventbus_router_oldest_unacked_age_seconds",
            "Age of the oldest stream entry the routers have not acknowledged (pending or unread).",
            age,
        )
        yield self._gauge(
            "eventbus_dead_letter_entries",
            "Entries in the dead-letter stream (malformed or refused events, with their reason).",
            dead,
        )
        # One stream for the environment, also on a cluster (not a scope's).
        yield self._gauge(
            "eventbus_rejected_task_messages",
            "Task messages workers refused and kept in rejected-tasks (an unknown task, or a malformed message).",
            int(self.client.xlen(self.keys.rejected_tasks)),
        )


class LogBufferGauges(_RedisGauges):
    """The log buffer between the producers and the log writer, and what it set aside."""

    scope_key = "log"

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        depth, age, rejected = 0, 0.0, 0
        counts: dict[str, int] = {}
        for keys in self.scopes():
            # The writer deletes what it wrote: the buffer's length is the backlog.
            scope_depth = int(self.client.xlen(keys.log_buffer))
            depth += scope_depth
            first: Any = self.client.xrange(keys.log_buffer, count=1) if scope_depth else []
            if first:
                age = max(age, _age_s(first[0][0], now_ms))
            rejected += int(self.client.xlen(keys.log_rejected))
            shed: Any = self.client.hgetall(keys.log_shed)
            for kind, count in shed.items():
                counts[_text(kind)] = counts.get(_text(kind), 0) + int(count)
        yield self._gauge("eventbus_log_buffer_records", "Records in the log buffer, not yet in PostgreSQL.", depth)
        yield self._gauge("eventbus_log_buffer_oldest_age_seconds", "Age of the oldest record in the log buffer.", age)
        yield self._gauge(
            "eventbus_log_rejected_entries",
            "Records PostgreSQL refused, set aside in the log-rejected stream.",
            rejected,
        )
        family = GaugeMetricFamily(
            "eventbus_log_shed_records",
            "Records dropped because the log buffer was full (LOG_BUFFER_FULL_POLICY=shed), until reset.",
            labels=["kind"],
        )
        family.add_metric(["event"], counts.get("e", 0))
        family.add_metric(["delivery"], counts.get("d", 0))
        yield family
