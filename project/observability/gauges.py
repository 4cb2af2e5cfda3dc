"""Gauges read from Redis when Prometheus scrapes: the router's lag, the log buffer, the
dead-letter and set-aside streams.

They describe shared state, not the process, so they are computed at scrape time (a few
O(1) or O(log n) commands) instead of being kept up to date on the dispatch path. Every
router and log writer that serves metrics reports the same values; take ``max`` across them.
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
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect(int(time.time() * 1000)))
        except redis.RedisError as exc:  # a scrape must not fail the process, nor hang on it
            log.warning("metrics: cannot read Redis for the %s gauges: %s", type(self).__name__, exc)
            return []

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        raise NotImplementedError

    @staticmethod
    def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)


class RouterGauges(_RedisGauges):
    """The event stream as the routers see it, and the dead-letter stream."""

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        stream = self.keys.stream
        lag, pending = _group_counts(self.client, stream, ROUTER_GROUP)
        yield self._gauge("eventbus_router_lag_entries", "Stream entries no router has read yet.", lag)
        yield self._gauge(
            "eventbus_router_pending_entries", "Stream entries read by a router, not yet acknowledged.", pending
        )
        age = _oldest_age_s(self.client, stream, ROUTER_GROUP, now_ms) if lag or pending else 0.0
        yield self._gauge(
            "eventbus_router_oldest_unacked_age_seconds",
            "Age of the oldest stream entry the routers have not acknowledged (pending or unread).",
            age,
        )
        yield self._gauge(
            "eventbus_dead_letter_entries",
            "Entries in the dead-letter stream (malformed or refused events, with their reason).",
            int(self.client.xlen(self.keys.dead_letter)),
        )


class LogBufferGauges(_RedisGauges):
    """The log buffer between the producers and the log writer, and what it set aside."""

    def _collect(self, now_ms: int) -> Iterator[Metric]:
        buffer = self.keys.log_buffer
        # The writer deletes what it wrote: the buffer's length is the backlog.
        depth = int(self.client.xlen(buffer))
        yield self._gauge("eventbus_log_buffer_records", "Records in the log buffer, not yet in PostgreSQL.", depth)
        first: Any = self.client.xrange(buffer, count=1) if depth else []
        yield self._gauge(
            "eventbus_log_buffer_oldest_age_seconds",
            "Age of the oldest record in the log buffer.",
            _age_s(first[0][0], now_ms) if first else 0.0,
        )
        yield self._gauge(
            "eventbus_log_rejected_entries",
            "Records PostgreSQL refused, set aside in the log-rejected stream.",
            int(self.client.xlen(self.keys.log_rejected)),
        )
        shed: Any = self.client.hgetall(self.keys.log_shed)
        family = GaugeMetricFamily(
            "eventbus_log_shed_records",
            "Records dropped because the log buffer was full (LOG_BUFFER_FULL_POLICY=shed), until reset.",
            labels=["kind"],
        )
        counts = {_text(k): int(v) for k, v in shed.items()}
        family.add_metric(["event"], counts.get("e", 0))
        family.add_metric(["delivery"], counts.get("d", 0))
        yield family
