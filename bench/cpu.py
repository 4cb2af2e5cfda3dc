"""CPU time of the processes an end-to-end benchmark runs, from ``/proc``: where a figure's cost goes.

A throughput ratio says how much slower ours is, not where the difference is spent. Every
process of the stack is on the same two cores, so CPU spent anywhere (the router, Redis,
PostgreSQL) is CPU the workers do not get. :class:`CpuMeter` reads the CPU time (user and
system) of each process by role before and after a run; the difference per event is what
each role cost. Linux only, like the rest of the benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ROLES", "CpuMeter"]

#: The roles, in the order they are reported.
ROLES = (
    "worker main process",
    "worker pool processes",
    "Redis",
    "router and log writer",
    "PostgreSQL",
    "sender (the benchmark process)",
)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (every thread), in seconds; 0 if it is gone."""
    try:
        # The command name (field 2) may hold spaces and parentheses: split after its last ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime: fields 14 and 15


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


class CpuMeter:
    """The CPU time of a stack's processes by role: one Celery worker (by its node name), the
    router, the Redis on ``redis_port``, PostgreSQL, and this process (which sends the work)."""

    def __init__(self, worker_node: str, redis_port: int) -> None:
        self.worker_node = worker_node
        self.redis_port = redis_port

    def roles(self) -> dict[int, str]:
        """Every process counted now, by pid."""
        found: dict[int, str] = {os.getpid(): ROLES[5]}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            cmd = _cmdline(pid)
            if not cmd:
                continue
            program = cmd.split(" ", 1)[0]
            if self.worker_node in cmd and "celery" in cmd:
                found[pid] = ROLES[1] if self.worker_node in _cmdline(_parent(pid)) else ROLES[0]
            elif "redis-server" in program and f":{self.redis_port}" in cmd:
                found[pid] = ROLES[2]
            elif "bench.router_probe" in cmd or ("project.cli" in cmd and " router" in cmd):
                found[pid] = ROLES[3]
            elif program.startswith("postgres") or program.endswith("/postgres"):
                found[pid] = ROLES[4]
        return found

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """``{pid: (role, CPU seconds so far)}``."""
        return {pid: (role, _cpu_s(pid)) for pid, role in self.roles().items()}

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """Yield a dict that holds, once the block ends, the CPU seconds each role spent in it.

        A process that started during the block counts from zero; one that ended, not at all.
        """
        before = self.snapshot()
        spent: dict[str, float] = {}
        yield spent
        after = self.snapshot()
        spent.update({role: 0.0 for role in ROLES})
        for pid, (role, seconds) in after.items():
            start = before.get(pid, (role, 0.0))[1]
            spent[role] += max(0.0, seconds - start)
