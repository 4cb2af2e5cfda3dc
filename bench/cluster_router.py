"""Router processes held at a gate, for :mod:`bench.cluster`: started, then run only once the events are in.

``python -m bench.cluster_router <consumer>`` builds the project's
:class:`~project.router.Router` for the subscriptions :func:`registry_bus` makes (the scopes
in ``BENCH_CLUSTER_SCOPES``) and answers ``ready`` on stdout. Then, a line on stdin each:
``go`` runs it (its ``run``: on a cluster a thread per scope), ``halt`` stops it and answers
``{"entries": <acknowledged in that run>}``. Closing stdin ends it. So a drain is timed
without the process' start (imports, connections), and one process serves every round.

It runs with the ``REDIS_URL``, ``CELERY_BROKER_URL`` and ``EVENTS_PREFIX`` it is given, so it
does not import :mod:`bench.harness`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from project.bus import EventBus
from project.settings import Settings

__all__ = ["MATCHES", "QUEUE", "GatedRouters", "registry_bus"]

MATCHES = 3  # subscriptions each event matches, as in the other dispatch rows
QUEUE = "bench"


def registry_bus(settings: Settings, scopes: Sequence[str]) -> EventBus:
    """A bus whose subscriptions match each scope's ``<scope>.item.made`` ``MATCHES`` times."""
    bus = EventBus(settings)
    for scope in scopes:
        for k in range(MATCHES):
            bus.subscribe(f"{scope}.item.made", name=f"bench.cluster_{scope}_{k}", queue=QUEUE)(_noop)
    return bus


def _noop(event: dict[str, Any]) -> None:
    pass


class GatedRouters:
    """``count`` router processes, each waiting for ``go`` (logs in ``<logs>-<n>.log``)."""

    def __init__(self, count: int, env: Mapping[str, str], root: Path, logs: Path) -> None:
        logs.parent.mkdir(exist_ok=True)
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []
        for i in range(count):
            with Path(f"{logs}-{i}.log").open("wb") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.cluster_router", f"bench-{i}"], cwd=root,
                    env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                ))  # fmt: skip

    def ready(self) -> None:
        """Wait until every one is built and connected."""
        for proc in self.procs:
            self._answer(proc, "ready")

    def go(self, k: int) -> None:
        """Run the first ``k``."""
        for proc in self.procs[:k]:
            self._write(proc, "go")

    def halt(self, k: int) -> list[int]:
        """Stop the first ``k``; the entries each acknowledged since its ``go``."""
        for proc in self.procs[:k]:
            self._write(proc, "halt")
        return [int(json.loads(self._answer(proc))["entries"]) for proc in self.procs[:k]]

    def close(self) -> None:
        """End every one."""
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @staticmethod
    def _write(proc: subprocess.Popen[str], line: str) -> None:
        stdin: IO[str] | None = proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def _answer(self, proc: subprocess.Popen[str], expected: str | None = None) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line or (expected is not None and line != expected):
            raise RuntimeError(f"a gated router answered {line!r} (its log: {self.logs}-<n>.log)")
        return line


def _serve(consumer: str) -> None:
    from project.router import Router
    from project.settings import get_settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    router = Router(settings, registry_bus(settings, os.environ["BENCH_CLUSTER_SCOPES"].split(",")).registry,
                    consumer=consumer)  # fmt: skip
    print("ready", flush=True)
    stop, thread, before = threading.Event(), None, 0
    for line in sys.stdin:
        if line.strip() == "go":
            stop, before = threading.Event(), router.total_stats().entries
            thread = threading.Thread(target=router.run, args=(stop,), name="router")
            thread.start()
        elif line.strip() == "halt" and thread is not None:
            stop.set()
            thread.join()
            # On a cluster each run makes new scope routers (their counts start at 0); in one
            # Redis the one router's counts go on.
            total = router.total_stats().entries
            print(json.dumps({"entries": total if router.scopes is not None else total - before}), flush=True)
    stop.set()  # stdin closed: the benchmark is over (or failed with this router running)
    if thread is not None:
        thread.join()


if __name__ == "__main__":
    _serve(sys.argv[1])
