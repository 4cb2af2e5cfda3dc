"""What every benchmark shares: its private environment, timing, ratios, results and the table.

Each figure is a ratio against a baseline measured in the same process tree, moments apart,
so a noisy machine cancels out; each measurement is repeated and the median quoted.

Importing this module fixes the environment the benchmark runs in (its own ``EVENTS_PREFIX``
and database, the bench handlers): the settings are read once, on first use, so that has to
happen before anything asks for them. It opens no connection.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A child process of the run (bench.rabbitmq) inherits BENCH_PREFIX: the same prefix and database.
PREFIX = os.environ.get("BENCH_PREFIX") or f"bench{uuid.uuid4().hex[:8]}"
DB_NAME = f"bench_{PREFIX}"
ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")

os.environ.update({
    "BENCH_PREFIX": PREFIX,
    "EVENTS_PREFIX": PREFIX,
    "EVENT_HANDLER_MODULES": "bench.handlers",
    "DATABASE_URL": ADMIN_DSN.rsplit("/", 1)[0] + f"/{DB_NAME}",
})  # fmt: skip

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from project.events import event_bus  # noqa: E402

__all__ = [
    "MACHINE",
    "PREFIX",
    "ROOT",
    "Result",
    "create_database",
    "create_group",
    "drop_database",
    "interleaved",
    "machine",
    "median_pairs",
    "pair_chunks",
    "print_table",
    "rate",
    "result",
    "wipe",
    "write_results",
]

# Filled in by bench.run before the first benchmark; every Result refers to it.
MACHINE: dict[str, str] = {}


@dataclass
class Result:
    """One line of the table and one object of ``bench/results.json``."""

    name: str
    ours: float
    baseline: float | None
    ratio: float | None
    target: str
    units: str
    met: bool | None
    machine: dict[str, str]
    note: str = ""


def result(name: str, ours: float, baseline: float | None, target: float | None, units: str, *,
           lower_is_better: bool = False, note: str = "", ratio: float | None = None) -> Result:  # fmt: skip
    """A comparison with its baseline: ``target`` is the ratio to reach (None: for reference only).

    ``ratio`` defaults to ``ours / baseline``; give it when it was measured pair by pair.
    ``baseline`` None: a figure of ours alone (a stage with no counterpart in the baseline).
    """
    if ratio is None:
        ratio = ours / baseline if baseline else None
    if target is None or ratio is None:
        met, target_text = None, "(reference)"
    elif lower_is_better:
        met, target_text = ratio <= target, f"ratio <= {target}"
    else:
        met, target_text = ratio >= target, f"ratio >= {target}"
    return Result(name, round(ours, 3), None if baseline is None else round(baseline, 3),
                  None if ratio is None else round(ratio, 3), target_text, units, met, MACHINE, note)  # fmt: skip


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU, cores and the versions that matter."""
    import celery
    import kombu

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "redis": str(event_bus.sync_client().info("server")["redis_version"]),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "platform": platform.platform(),
    }


# -- timing -----------------------------------------------------------------------------------


def rate(count: int, run: Callable[[], object]) -> float:
    """``count`` divided by the seconds ``run`` takes."""
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def pair_chunks(n: int, rounds: int) -> tuple[int, int]:
    """The chunk size and the number of chunk pairs for ``rounds`` of ``n`` operations a side."""
    chunk = max(50, n // 10)
    return chunk, rounds * max(1, n // chunk)


def median_pairs(pairs: Iterable[tuple[float, float]]) -> tuple[float, float, float]:
    """The median of ours, of the baseline, and of the ratio within each pair."""
    pairs = list(pairs)
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))  # fmt: skip


def interleaved(
    ours: Callable[[int], float], baseline: Callable[[int], float], n: int, rounds: int
) -> tuple[float, float, float]:
    """Alternate ours and the baseline in short chunks; return both medians and the median ratio.

    Each chunk pair runs within milliseconds of each other, so a burst of noise from a
    neighbour hits both sides of one pair rather than one side of the whole comparison.
    """
    chunk, count = pair_chunks(n, rounds)
    return median_pairs((ours(chunk), baseline(chunk)) for _ in range(count))


# -- the environment --------------------------------------------------------------------------


def wipe(client: redis.Redis) -> None:
    """Delete every key of this run's prefix (stream, queues, dedup keys, log buffer)."""
    for key in client.scan_iter(match=f"{PREFIX}:*", count=1000):
        client.delete(key)


def create_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create consumer group ``group`` on ``stream`` (made if missing), reading from its start.

    Done here rather than with the project's helper so the benchmark does not depend on
    which module keeps it; the prefix is wiped first, so the group never exists already.
    """
    client.xgroup_create(stream, group, id="0", mkstream=True)


def create_database() -> None:
    """Create this run's database and migrate it."""
    admin = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{DB_NAME}"'))
    admin.dispose()
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip


def drop_database() -> None:
    """Drop this run's database, even with connections still open."""
    admin = sa.create_engine(ADMIN_DSN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    admin.dispose()


# -- results ------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    """Print the results as an aligned table."""
    header = ("benchmark", "ours", "baseline", "ratio", "target", "met", "units")
    rows = [
        (r.name, f"{r.ours:,.2f}", "" if r.baseline is None else f"{r.baseline:,.2f}",
         "" if r.ratio is None else f"{r.ratio:.2f}", r.target, {True: "yes", False: "NO", None: "-"}[r.met], r.units)
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def write_results(results: list[Result], path: Path) -> None:
    """Write ``results`` as the JSON list ``bench/results.json`` holds."""
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
