"""Flower's settings (read from the working directory by ``celery flower``), from project.settings."""

from __future__ import annotations

from project.settings import get_settings

_settings = get_settings()
_password = _settings.flower_password.get_secret_value()

# The default password is in the README for everyone to read: Flower can revoke tasks and
# stop workers, so it does not start behind it. `make run` writes a random one to .run/env.
if _password in ("", "change-me"):
    raise SystemExit("flower: set FLOWER_PASSWORD (not the default 'change-me'); `make run` makes one in .run/env")

address = _settings.flower_address
port = _settings.flower_port
basic_auth = [f"{_settings.flower_user}:{_password}"]
# With Celery's queues on RabbitMQ, Flower reads their lengths from the management API.
if _settings.flower_broker_api:
    broker_api = _settings.flower_broker_api
