"""The example application's module tests, written with the test kit (project.testing).

Each test takes ``events`` and runs twice: in memory (the kit: handlers in this process, no
router, no worker, no dispatcher state in Redis) and against the real stack (a router and a
prefork worker, LiveEvents). The module's own storage is real in both: the solar and
synthesis modules keep their rows in PostgreSQL, the memory module its cache in Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import tasks.db
from project.events import event_bus
from project.settings import get_settings
from project.testing import EventRecorder, InMemoryEvents, LiveEvents
from tasks.settings import get_app_settings
from tests.integration.conftest import (  # noqa: F401  # fixtures
    REDIS_URL,
    Stack,
    _db_url,
    broker,
    database,
    prefix,
    stack,
    template_db,
)

APP_QUEUES = "solar,memory,synthesis,cosmic"


def _forget_settings() -> None:
    get_settings.cache_clear()
    get_app_settings.cache_clear()
    event_bus.close()
    event_bus._target = None
    event_bus._contracts_loaded = False
    if tasks.db._engine is not None:
        tasks.db._engine.dispose()
    tasks.db._engine = None


@pytest.fixture
def app_env(prefix: str, database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: F811
    """This process configured as the example application, on the test's prefix and database."""
    for name, value in {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": _db_url(database),
        "EVENTS_PREFIX": prefix,
        "EVENT_HANDLER_MODULES": "handlers",
        "EVENT_CONTRACT_MODULES": "contracts",
    }.items():
        monkeypatch.setenv(name, value)
    _forget_settings()
    yield
    _forget_settings()


@pytest.fixture
def engine(app_env: None) -> Iterator[sa.Engine]:
    yield tasks.db.engine()


@pytest.fixture(params=["in-memory", "real-stack"])
def events(request: pytest.FixtureRequest, app_env: None) -> Iterator[EventRecorder]:
    """The kit's ``events`` fixture, and the same methods against a router and a worker."""
    if request.param == "in-memory":
        with InMemoryEvents(modules=["handlers"]) as recorder:
            yield recorder
        return
    live: Stack = request.getfixturevalue("stack")
    live.env.update({"EVENT_HANDLER_MODULES": "handlers", "EVENT_CONTRACT_MODULES": "contracts"})
    live.start_worker(queues=APP_QUEUES)
    live.start_router()
    with LiveEvents(live.settings, modules=["handlers"]) as recorder:
        yield recorder
