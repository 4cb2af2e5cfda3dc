"""The application's database engine: one per process, made on first use, never shared over fork."""

from __future__ import annotations

import os

import sqlalchemy as sa

from project.events import event_bus

__all__ = ["engine"]

_engine: sa.Engine | None = None


def engine() -> sa.Engine:
    """This process's engine for ``DATABASE_URL``."""
    global _engine
    if _engine is None:
        _engine = sa.create_engine(event_bus.settings.database_url, pool_pre_ping=True, pool_size=2)
    return _engine


def _forget_after_fork() -> None:
    # A prefork child must not reuse the parent's sockets; it makes its own pool.
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


os.register_at_fork(after_in_child=_forget_after_fork)
