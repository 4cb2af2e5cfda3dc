"""Fixtures of the fault suite: a laboratory per test (stacks, private Redis servers,
network namespaces), torn down whatever the test did, and the logs of a failed test."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    Lab,
    Stack,
    create_template,
    drop_database,
    forget_run,
    sh,
    sweep_stale_disks,
    sweep_stale_netns,
    sweep_stale_processes,
)
from tests.rabbitmq import broker, pytest_generate_tests  # noqa: F401  # fixture, hook

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def fault_template() -> Iterator[str]:
    """A database migrated to head with the suite's effects table, copied by every stack."""
    name = f"eventbus_ftmpl_{os.getpid()}"
    sweep_stale_processes()
    sweep_stale_netns()
    sweep_stale_disks()
    create_template(name)
    yield name
    drop_database(name)
    forget_run()


@pytest.fixture
def lab(fault_template: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Makes what a scenario needs and removes it all afterwards, even when the test failed."""
    laboratory = Lab(tmp_path, fault_template)
    try:
        yield laboratory
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for stack in laboratory.stacks:
                for log in sorted(stack.workdir.glob("*.log")):
                    sys.stderr.write(f"\n----- {log.name} -----\n{log.read_text(errors='replace')[-5000:]}\n")
        laboratory.close()


@pytest.fixture
def stack(lab: Lab, broker: str) -> Stack:  # noqa: F811  # the imported fixture
    """An environment on the shared Redis, with its own prefix and database; no process yet."""
    return lab.stack(broker=broker)


@pytest.fixture
def needs_netns() -> None:
    """Skip unless this process may create network namespaces (root, iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    probe = sh("ip", "netns", "list", check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns is not usable here: {probe.stderr.strip()}")


@pytest.fixture
def needs_redis_server() -> None:
    """Skip unless a redis-server binary is installed (private servers are started from it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
