"""The ``eventbus redrive|replay|backfill`` commands, and how a long run shows its progress.

The work itself is in :mod:`project.operations`; this is its command line: filters from
options, a progress bar on a terminal (plain lines otherwise), and Ctrl-C, which stops the
run cleanly so that the same command goes on from there.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from project.errors import EventBusError
from project.operations import DeliveryFilter, OperationResult, ReplayFilter, redrive, replay
from project.operations import Progress as RunProgress
from project.settings import get_settings

__all__ = ["add_commands", "terminal_progress"]


class _Quiet:
    def start(self, total: int) -> None: ...
    def advance(self, done: int, sent: int) -> None: ...
    def close(self) -> None: ...


class _LineProgress:
    """Plain lines every few seconds, for output that is not a terminal."""

    def __init__(self, label: str, out: Any, every_s: float = 5.0) -> None:
        self.label, self.out, self.every_s = label, out, every_s
        self.total, self.began, self.last = 0, time.monotonic(), 0.0

    def start(self, total: int) -> None:
        self.total, self.began = total, time.monotonic()
        print(f"{self.label}: {total} to go", file=self.out, flush=True)

    def advance(self, done: int, sent: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.began, 1e-6)
        left = (self.total - done) / rate if rate > 0 else 0.0
        print(
            f"{self.label}: {done}/{self.total} done, {sent} sent, {rate:.0f}/s, about {left:.0f}s left",
            file=self.out,
            flush=True,
        )

    def close(self) -> None: ...


class _RichProgress:
    """A progress bar with done/total, rate and time left, on a terminal."""

    def __init__(self, label: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: Any = None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("run", total=total)

    def advance(self, done: int, sent: int) -> None:
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()


def terminal_progress(label: str, out: Any = None) -> RunProgress:
    """A progress bar if ``out`` (default stderr) is a terminal, else plain lines."""
    out = out or sys.stderr
    if getattr(out, "isatty", lambda: False)():
        return _RichProgress(label)
    return _LineProgress(label, out)


def _when(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise EventBusError(f"not an ISO-8601 time: {value!r} (for example 2026-11-28T09:00 or 2026-11-28)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _run_cli(label: str, run: Callable[..., OperationResult], args: Any, **kwargs: Any) -> int:
    stop = threading.Event()

    def interrupt(signum: int, _frame: Any) -> None:
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        result = run(
            dry_run=args.dry_run, per_second=args.per_second, actor=args.actor, stop=stop,
            progress=_Quiet() if args.dry_run else terminal_progress(label), **kwargs,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    for line in result.lines if args.dry_run or args.verbose else []:
        print(line)
    verb = "would send" if args.dry_run else "sent"
    count = len(result.lines) if args.dry_run else result.sent
    print(
        f"{label} {result.run_id}: {result.selected} selected, {count} {verb}, {result.skipped} skipped"
        + (" (dry run: nothing sent)" if args.dry_run else ""),
        file=sys.stderr,
    )
    if result.interrupted:
        print(f"{label}: interrupted; run the same command again to go on (nothing is sent twice)", file=sys.stderr)
        return 130
    return 0


def _common(p: Any) -> None:
    p.add_argument("--since", type=_when, help="events published at or after (ISO-8601, UTC unless given)")
    p.add_argument("--until", type=_when, help="events published before")
    p.add_argument("--user", help="only the events of this user_id")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    p.add_argument("--per-second", type=float, help="send at most this many a second")
    p.add_argument("--actor", help="who runs it, for the audit line (default: the OS user)")
    p.add_argument("--verbose", action="store_true", help="print each delivery skipped")


def _cmd_redrive(args: Any) -> int:
    statuses = tuple(s.strip() for s in args.status.split(",") if s.strip())
    flt = DeliveryFilter(statuses=statuses, handler=args.handler, pattern=args.pattern, user_id=args.user,
                         since=args.since, until=args.until, error=args.error)  # fmt: skip
    return _run_cli("redrive", lambda **kw: redrive(get_settings(), flt, **kw), args)


def _cmd_replay(args: Any) -> int:
    flt = ReplayFilter(pattern=args.pattern, since=args.since, until=args.until, handler=args.handler,
                       user_id=args.user)  # fmt: skip
    return _run_cli("replay", lambda **kw: replay(get_settings(), flt, again=args.again, **kw), args)


def _cmd_backfill(args: Any) -> int:
    def run(**kw: Any) -> OperationResult:
        flt = ReplayFilter(pattern=args.pattern, since=args.since, until=args.until, handler=args.handler,
                           user_id=args.user)  # fmt: skip
        return replay(get_settings(), flt, again=args.again, operation="backfill", **kw)

    return _run_cli("backfill", run, args)


def add_commands(sub: Any) -> None:
    """Add ``redrive``, ``replay`` and ``backfill`` to the ``eventbus`` command."""
    p = sub.add_parser("redrive", help="send dead or rejected deliveries again (the same delivery)")
    p.add_argument("--status", default="dead,rejected", help="dead, rejected or both (default)")
    p.add_argument("--handler", help="only this handler (task name)")
    p.add_argument("--pattern", help="only events matching this pattern ('cosmic.#')")
    p.add_argument("--error", help="only deliveries whose last error is exactly this")
    _common(p)
    p.set_defaults(func=_cmd_redrive)

    p = sub.add_parser("replay", help="deliver past events again to the current subscriptions")
    p.add_argument("--pattern", default="#", help="events matching this pattern (default '#': all)")
    p.add_argument("--handler", help="only to this handler (a backfill)")
    p.add_argument("--again", action="store_true", help="replay once more what an earlier run already replayed")
    _common(p)
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("backfill", help="feed a new handler the past events it subscribes to")
    p.add_argument("handler", help="the handler (task name), as `eventbus routes` lists it")
    p.add_argument("--pattern", default="#", help="only events matching this pattern")
    p.add_argument("--again", action="store_true", help="send once more what an earlier backfill sent")
    _common(p)
    p.set_defaults(func=_cmd_backfill)
