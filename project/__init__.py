"""A Celery-based, task-driven event dispatcher: modules talk only through events."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
