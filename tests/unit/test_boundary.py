"""Where the dispatcher ends and the application begins, seen from a fresh process.

Each check runs in a subprocess: settings are read once per process, and what matters is
which modules a process imports, which this test process (that imports everything) hides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOP = "tests.second_app.handlers"
# Prints what a process has imported of the cosmic application, after the snippet before it.
_REPORT = (
    "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m in ('tasks', 'handlers') "
    "or m.startswith(('tasks.', 'handlers.')))))"
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("EVENT_HANDLER_MODULES", "APP_TASK_MODULES")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def _celery_config(**env: str) -> tuple[list[str], list[str], list[str]]:
    code = "import celeryconfig as c, json; print(json.dumps([list(c.imports), sorted(c.beat_schedule)]))\n" + _REPORT
    out = _python(code, **env)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    imports, schedule = json.loads(first)
    return imports, schedule, json.loads(second)


def test_the_cosmic_application_gets_its_tasks_and_schedule_by_default() -> None:
    imports, schedule, _ = _celery_config()
    assert imports == ["tasks.cosmic", "tasks.synthesis"]
    assert schedule == ["check-full-moon", "check-solar-storms"]


def test_another_application_gets_nothing_of_the_cosmic_one() -> None:
    imports, schedule, cosmic = _celery_config(EVENT_HANDLER_MODULES=SHOP)
    assert (imports, schedule, cosmic) == ([], [], [])


@pytest.mark.parametrize(
    ("modules", "imports", "schedule"),
    [
        ("tasks.cosmic", ["tasks.cosmic"], ["check-full-moon", "check-solar-storms"]),
        ("tasks.synthesis", ["tasks.synthesis"], []),
        ("", [], []),
    ],
)
def test_app_task_modules_names_the_application_s_task_modules(
    modules: str, imports: list[str], schedule: list[str]
) -> None:
    assert _celery_config(EVENT_HANDLER_MODULES=SHOP, APP_TASK_MODULES=modules)[:2] == (imports, schedule)


def test_the_dispatcher_s_commands_load_no_application_command() -> None:
    code = (
        "import contextlib, io; from project.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['routes'])\n" + _REPORT
    )
    # The integration tests' handlers: loading them connects to nothing.
    out = _python(code, EVENT_HANDLER_MODULES="tests.integration.app")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_application_commands_are_found_through_their_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout and "create a user, publish user.birth_data.updated" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "demo", "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and "--wait-s" in out.stdout, out.stderr


def test_an_unknown_command_still_fails_as_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "project.cli", "no-such-command"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "invalid choice: 'no-such-command'" in out.stderr
