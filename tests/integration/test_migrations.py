"""The Alembic migrations create exactly the tables the log writer writes to."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import ROOT, Stack, _db_url


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrated_schema_matches_the_tables_the_code_uses(stack: Stack) -> None:
    out = _alembic(_db_url(stack.database), "check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No new upgrade operations detected" in out.stdout + out.stderr


def test_migrations_downgrade_and_upgrade_again(stack: Stack) -> None:
    url = _db_url(stack.database)
    assert _alembic(url, "downgrade", "base").returncode == 0
    assert stack.query("SELECT to_regclass('events_log')")[0][0] is None
    assert _alembic(url, "upgrade", "head").returncode == 0
    names = {r[0] for r in stack.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"events_log", "event_deliveries", "alembic_version"} <= names
