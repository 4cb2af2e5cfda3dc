"""Create the database DATABASE_URL names, if it does not exist yet (used by ``make run``)."""

from __future__ import annotations

import sqlalchemy as sa

from project.settings import get_settings

url = sa.make_url(get_settings().database_url)
admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}).first()
    if not exists:
        conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
        print(f"created database {url.database}")
admin.dispose()
