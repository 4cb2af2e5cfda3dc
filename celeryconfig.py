"""The application's Celery settings: the dispatcher's from ``project.settings``, its own tasks and schedule.

This module belongs to the cosmic application, not to the dispatcher (``project.celery_app``
loads it by name), so it may import ``tasks``; it does so only when the cosmic application
is the one running. Another application, named by ``EVENT_HANDLER_MODULES``, gets none of
the cosmic tasks nor their schedule unless ``APP_TASK_MODULES`` asks for them.
"""

from __future__ import annotations

from typing import Any

from project.keys import Keys
from project.settings import get_settings

_settings = get_settings()
_keys = Keys(_settings.events_prefix)

# CELERY_BROKER_URL (an AMQP URL: RabbitMQ), or else the event Redis.
broker_url = _settings.broker_url
broker_connection_retry_on_startup = True
broker_transport_options: dict[str, Any]
if _settings.broker_is_amqp:
    # A task Celery itself sends (a retry with its countdown) waits for RabbitMQ's confirm.
    broker_transport_options = {"confirm_publish": True}
    # Queues are declared durable, as the router declares them (project.broker.celery_queue);
    # quorum queues need a topic exchange for Celery's native delayed delivery of retries.
    task_create_missing_queue_type = "quorum" if _settings.broker_quorum_queues else "classic"
    task_create_missing_queue_exchange_type = "topic" if _settings.broker_quorum_queues else None
    task_default_exchange_type = "topic" if _settings.broker_quorum_queues else "direct"
else:
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

# The cosmic application's task modules, imported by every worker and beat when it runs.
_COSMIC_TASK_MODULES = ("tasks.cosmic", "tasks.synthesis")


def _app_task_modules() -> tuple[str, ...]:
    if _settings.app_task_modules is not None:
        return tuple(_settings.app_task_modules)
    # The cosmic application runs when its handler package is loaded; with only another
    # application's handlers, importing tasks.* would load the cosmic application into it.
    cosmic = any(m == "handlers" or m.startswith("handlers.") for m in _settings.event_handler_modules)
    return _COSMIC_TASK_MODULES if cosmic else ()


def _cosmic_schedule() -> dict[str, dict[str, Any]]:
    from tasks.settings import get_app_settings

    app_settings = get_app_settings()
    return {
        "check-solar-storms": {
            "task": "tasks.cosmic.check_solar_storms",
            "schedule": app_settings.storm_check_interval_s,
            "options": {"queue": "cosmic", "expires": app_settings.storm_check_interval_s},
        },
        "check-full-moon": {
            "task": "tasks.cosmic.check_full_moon",
            "schedule": app_settings.full_moon_check_interval_s,
            "options": {"queue": "cosmic", "expires": app_settings.full_moon_check_interval_s},
        },
    }


# The application's own tasks (the per-handler tasks are registered when a worker starts).
imports = _app_task_modules()

# Only the beat holding the leader lock in Redis sends the periodic tasks.
beat_scheduler = "project.beat:LeaderScheduler"
beat_max_loop_interval = 5
# The cosmic checks, whenever their tasks are imported: never for another application.
beat_schedule = _cosmic_schedule() if "tasks.cosmic" in imports else {}
