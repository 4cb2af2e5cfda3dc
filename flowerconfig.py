"""Flower's settings (read from the working directory by ``celery flower``), from project.settings."""

from __future__ import annotations

from project.settings import get_settings

_settings = get_settings()

address = _settings.flower_address
port = _settings.flower_port
basic_auth = [f"{_settings.flower_user}:{_settings.flower_password.get_secret_value()}"]
