"""Plain Celery tasks: the baselines, run by the same workers as our handlers.

With ``BENCH_STAGES_DIR`` set (the end-to-end stack of :mod:`bench.stack` sets it for its
worker), importing this module (the worker does: ``-I bench.tasks``) also connects two
receivers that note, for the latency probes only (ours and the baseline's), when the
worker's main process received the task (``task_received``) and when a pool process is
about to run it (``task_prerun``, before the task's ``before_start`` hook): one line each,
``r|p <task id> <time>``, appended to ``worker-<pid>.txt`` in that directory. A line write
per probe and hook, on both sides alike; no Redis command.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Any

from celery import signals

from project.celery_app import app
from project.events import event_bus


@app.task(name="bench.tasks.probe", bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def probe(self: Any, sent_at: float) -> None:
    """Record apply_async → task start: ``<seconds> <start time> <task id> <task id>`` (bench.latency)."""
    started = time.time()
    task_id = self.request.id
    event_bus.sync_client().rpush(
        f"{event_bus.keys.prefix}:bench:latency", f"{started - sent_at:.6f} {started:.6f} {task_id} {task_id}"
    )


@app.task(name="bench.tasks.count", ignore_result=True)  # type: ignore[untyped-decorator]
def count(*args: Any) -> None:
    """The same no-op (counted) work as the bench handlers."""
    event_bus.sync_client().incr(f"{event_bus.keys.prefix}:bench:done")


# -- the stage stamps (bench.latency) ------------------------------------------------------

STAGES_DIR = os.environ.get("BENCH_STAGES_DIR")
PROBES = frozenset({"bench.tasks.probe", "bench.handlers.latency_probe"})
_files: dict[int, IO[str]] = {}  # by pid: a forked pool process opens its own


def _stamp(kind: str, task_id: Any, at: float) -> None:
    pid = os.getpid()
    out = _files.get(pid)
    if out is None:
        assert STAGES_DIR is not None
        out = _files[pid] = (Path(STAGES_DIR) / f"worker-{pid}.txt").open("a", buffering=1)
    out.write(f"{kind} {task_id} {at:.6f}\n")


def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    at = time.time()
    if request is not None and request.name in PROBES:
        _stamp("r", request.id, at)


def _on_prerun(sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
    at = time.time()
    if task is not None and task.name in PROBES:
        _stamp("p", task_id, at)


if STAGES_DIR:
    signals.task_received.connect(_on_received, weak=False, dispatch_uid="bench.stages.received")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="bench.stages.prerun")
