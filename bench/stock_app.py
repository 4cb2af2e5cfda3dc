"""Stock Celery, for the throughput benchmark's second baseline: a worker without eventbus.

``celery -A bench.stock_app worker -Q bench-stock`` runs the same no-op counted task as
:mod:`bench.tasks` on the same Redis, with the settings of ``celeryconfig`` that decide how a
worker takes and acknowledges a task (late acknowledgement, prefetch 1, task events on, no
results, the same key prefix and visibility timeout) but none of the dispatcher: no
``project.celery_app`` signals, and kombu as released (without :mod:`project.kombu_fixes`).
It is what a team running plain Celery has, to compare an eventbus worker with.
"""

from __future__ import annotations

import redis
from celery import Celery

from project.keys import Keys
from project.settings import get_settings

__all__ = ["QUEUE", "app", "count"]

QUEUE = "bench-stock"

_settings = get_settings()
app = Celery("bench_stock", broker=_settings.broker_url)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "global_keyprefix": Keys(_settings.events_prefix).celery_keyprefix,
        "visibility_timeout": _settings.broker_visibility_timeout_s,
    },
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=False,
)
_client: redis.Redis | None = None


@app.task(name="bench.stock.count", ignore_result=True)  # type: ignore[untyped-decorator]
def count() -> None:
    """The same no-op (counted) work as the bench handlers and ``bench.tasks.count``."""
    global _client
    if _client is None:  # made in the pool process that runs it
        _client = redis.Redis.from_url(_settings.redis_url)
    _client.incr(f"{_settings.events_prefix}:bench:done")
