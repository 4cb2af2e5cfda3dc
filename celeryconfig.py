"""Celery settings, all derived from the one settings object (``project.settings``)."""

from __future__ import annotations

from project.keys import Keys
from project.settings import get_settings

_settings = get_settings()
_keys = Keys(_settings.events_prefix)

broker_url = _settings.redis_url
broker_connection_retry_on_startup = True
broker_transport_options = {
    # Every Celery key lives under the environment's prefix, next to the event keys.
    "global_keyprefix": _keys.celery_keyprefix,
    "visibility_timeout": _settings.broker_visibility_timeout_s,
    "unacked_restore_interval": _settings.broker_restore_interval_s,
    "unacked_restore_throttle": 1,
}

# JSON only, everywhere: a pickled message is refused by the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"
result_accept_content = ["json"]

# Fire-and-forget: handlers' results are not kept.
result_backend = None
task_ignore_result = True

# A task is acknowledged after it ran; a worker lost mid-task puts it back on its queue.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

task_default_queue = "default"
task_create_missing_queues = True
task_routes = ("project.delivery.route_task",)

# Flower needs task events.
worker_send_task_events = True
task_send_sent_event = False

enable_utc = True
timezone = "UTC"

# The application's own tasks (the per-handler tasks are registered when a worker starts).
imports = ("tasks.cosmic", "tasks.synthesis")

# Periodic cosmic checks. Only the beat holding the leader lock in Redis sends them.
beat_scheduler = "project.beat:LeaderScheduler"
beat_max_loop_interval = 5
beat_schedule = {
    "check-solar-storms": {
        "task": "tasks.cosmic.check_solar_storms",
        "schedule": _settings.storm_check_interval_s,
        "options": {"queue": "cosmic", "expires": _settings.storm_check_interval_s},
    },
    "check-full-moon": {
        "task": "tasks.cosmic.check_full_moon",
        "schedule": _settings.full_moon_check_interval_s,
        "options": {"queue": "cosmic", "expires": _settings.full_moon_check_interval_s},
    },
}
