"""Alembic environment: the URL is ``DATABASE_URL`` (or ``-x url=...``), read via project.settings.

The migrations are the deployment's: the dispatcher's event log (``project.tables``) and the
cosmic application's tables (``tasks.tables``) live in one database. This module is not part
of ``project``, so it may import the application.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

from project.settings import get_settings
from project.tables import metadata as eventlog_metadata
from tasks.tables import metadata as application_metadata

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = context.get_x_argument(as_dictionary=True).get("url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=[eventlog_metadata, application_metadata], literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=[eventlog_metadata, application_metadata])
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
