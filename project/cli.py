"""The ``eventbus`` command: run a router or the log writer, publish, list routes, tail events.

An application adds its own commands (the cosmic one: ``eventbus demo``) through the
``eventbus.commands`` entry point group: each entry names a callable that takes the
subcommands of the parser (:data:`Subcommands`) and adds its own, each with
``set_defaults(func=...)``, a function of the parsed arguments returning the exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, TypeAlias, TypeVar

import redis

from project.envelope import validate_event_name
from project.errors import EventBusError, InvalidEventName
from project.events import event_bus
from project.patterns import PatternTrie
from project.settings import get_settings

__all__ = ["COMMANDS_GROUP", "Subcommands", "main"]

log = logging.getLogger("eventbus")

COMMANDS_GROUP = "eventbus.commands"
#: What an ``eventbus.commands`` entry point is called with: ``add_parser`` adds a command.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

T = TypeVar("T")

# What building a router or log writer meets while Redis does not answer yet: asking whether it
# is a cluster fails (RedisError), or a cluster client finds no node (RedisClusterException).
_REDIS_DOWN = (redis.RedisError, redis.exceptions.RedisClusterException)
_RETRY_MAX_S = 5.0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _when_redis_answers(what: str, make: Callable[[], T], stop: threading.Event) -> T | None:
    """``make()``, tried again with a log line until Redis answers; None if ``stop`` came first.

    A router or log writer started before Redis (a reboot, a compose file without ordering)
    waits for it instead of exiting: building one asks Redis whether it is a cluster.
    """
    delay_s = 0.5
    while True:
        try:
            return make()
        except _REDIS_DOWN as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            log.warning("%s: Redis does not answer (%s); trying again in %.1fs", what, first, delay_s)
        if stop.wait(delay_s):
            return None
        delay_s = min(delay_s * 2, _RETRY_MAX_S)


def _log_writer(stop: threading.Event) -> Any:
    from project.eventlog import LogWriter

    return _when_redis_answers("log writer", lambda: LogWriter(get_settings()), stop)


def _run_log_writer(stop: threading.Event) -> None:
    writer = _log_writer(stop)
    if writer is not None:
        writer.run(stop)


def _serve_metrics(*, router: bool, log_writer: bool) -> None:
    from project.observability.exposition import serve_process

    serve_process(get_settings(), router=router, log_writer=log_writer)


def cmd_router(args: argparse.Namespace) -> int:
    """Run a router (and, unless --no-log-writer, the log writer in a thread of the same process)."""
    from project.reconciler import Reconciler
    from project.router import Router

    event_bus.load_modules()
    stop = _stop_on_signals()
    # Built first: it is what asks Redis whether it is a cluster, and waits until it answers.
    router = _when_redis_answers(
        "router", lambda: Router(get_settings(), event_bus.registry, consumer=args.consumer), stop
    )
    if router is None:
        return 0
    reconciler = _when_redis_answers("reconciler", lambda: Reconciler(get_settings()), stop)
    if reconciler is None:
        return 0
    _serve_metrics(router=True, log_writer=not args.no_log_writer)
    writer = None
    if not args.no_log_writer:
        writer = threading.Thread(target=_run_log_writer, args=(stop,), name="log-writer", daemon=True)
        writer.start()
    threading.Thread(target=reconciler.run, args=(stop,), name="reconciler", daemon=True).start()
    log.info(
        "router %s: %d subscriptions, prefix %r%s", router.consumer, len(event_bus.registry), router.keys.root,
        " (Redis Cluster: a stream per scope)" if router.keys.cluster else "",
    )  # fmt: skip
    router.run(stop)
    if writer is not None:
        writer.join(timeout=10)
    log.info("router stopped: %s", router.stats)
    return 0


def cmd_log_writer(args: argparse.Namespace) -> int:
    """Run the log writer alone."""
    stop = _stop_on_signals()
    writer = _log_writer(stop)
    if writer is None:
        return 0
    _serve_metrics(router=False, log_writer=True)
    writer.run(stop)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one event (or a structured-mode CloudEvent, --cloudevent) and print its event_id."""
    if args.cloudevent is not None:
        from project.cloudevents import publish_cloudevent

        given = [
            name
            for name, value in zip(
                ("EVENT_TYPE", "--data", "--user", "--module"),
                (args.event_type, args.data, args.user, args.module),
                strict=True,
            )
            if value is not None
        ]
        if given:
            print(f"eventbus publish: --cloudevent carries the whole event; drop {', '.join(given)}", file=sys.stderr)
            return 2
        try:
            if args.cloudevent == "-":
                text = sys.stdin.read()
            else:
                with open(args.cloudevent, encoding="utf-8") as file:
                    text = file.read()
            cloudevent = json.loads(text)
        except OSError as exc:
            print(f"eventbus publish: cannot read {args.cloudevent}: {exc.strerror}", file=sys.stderr)
            return 2
        except ValueError as exc:  # not UTF-8, not JSON
            print(f"eventbus publish: {args.cloudevent} is not a JSON CloudEvent: {exc}", file=sys.stderr)
            return 2
        print(publish_cloudevent(event_bus, cloudevent))
        return 0
    if args.event_type is None:
        print("eventbus publish: give an EVENT_TYPE, or --cloudevent FILE", file=sys.stderr)
        return 2
    try:
        data = json.loads(args.data) if args.data else None
    except json.JSONDecodeError as exc:
        print(f"eventbus publish: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    print(event_bus.publish_sync(args.event_type, data, user_id=args.user, module=args.module or "cli"))
    return 0


def cmd_requeue_rejected(args: argparse.Namespace) -> int:
    """Send task messages that workers refused (unknown task) back to their queues."""
    from project.rejected import list_rejected, requeue_rejected

    done = requeue_rejected(event_bus, handler=args.handler, dry_run=args.dry_run)
    for r in done:
        print(f"{'would send' if args.dry_run else 'sent'} {r.task}[{r.task_id}] to {r.queue!r} ({r.reason})")
    print(f"{len(done)} {'would be sent' if args.dry_run else 'sent again'}", file=sys.stderr)
    malformed = sum(r.malformed for r in list_rejected(event_bus))
    if malformed:
        print(
            f"{malformed} malformed task messages stay in {event_bus.keys.rejected_tasks}: no worker can run them",
            file=sys.stderr,
        )
    return 0


def cmd_rejected(args: argparse.Namespace) -> int:
    """List the task messages workers refused and kept; with ``--drop-malformed``, delete the malformed ones."""
    from project.rejected import drop_malformed, list_rejected

    kept = list_rejected(event_bus, handler=args.handler)
    for r in kept:
        what = "malformed" if r.malformed else f"{r.task}[{r.task_id}]"
        print(f"{r.entry_id}  {what}  queue={r.queue!r}  {r.reason}")
    print(f"{len(kept)} kept in {event_bus.keys.rejected_tasks}", file=sys.stderr)
    if args.drop_malformed:
        print(f"{len(drop_malformed(event_bus))} malformed deleted", file=sys.stderr)
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    """Print every subscription: pattern(s), handler, queue."""
    event_bus.load_modules()
    rows = [(", ".join(s.patterns), s.name, s.queue) for s in event_bus.registry]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("PATTERN", "HANDLER", "QUEUE"))]
    for row in [("PATTERN", "HANDLER", "QUEUE"), *rows]:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Print live events (from pub/sub: at-most-once, for watching, not for processing).

    On a Redis Cluster a PUBLISH reaches every node, so one subscription on any node sees the
    events of every scope.
    """
    trie: PatternTrie[str] = PatternTrie()
    trie.insert(args.pattern, "tail")
    try:
        keys = event_bus.keys
        pubsub = event_bus.sync_client().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.psubscribe(keys.channel_pattern)
    except _REDIS_DOWN as exc:
        print(f"eventbus tail: cannot subscribe in Redis: {exc}", file=sys.stderr)
        return 1
    stop = _stop_on_signals()
    print(f"listening for {args.pattern!r} on {keys.channel_pattern!r} (Ctrl-C stops)", file=sys.stderr)
    count = 0
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.5)
        if message is None:
            continue
        event_type = keys.event_type_of_channel(message["channel"].decode())
        try:
            validate_event_name(event_type)
        except InvalidEventName:  # another channel under the prefix (Celery's own)
            continue
        if not trie.match(event_type):
            continue
        line = message["data"].decode()
        if args.format == "cloudevents":
            from project.cloudevents import to_cloudevent

            try:
                line = json.dumps(to_cloudevent(json.loads(line)), separators=(",", ":"))
            except ValueError as exc:  # not JSON, or no valid envelope (InvalidEventData)
                print(f"eventbus tail: skipped a message on {event_type!r}: {exc}", file=sys.stderr)
                continue
        print(line, flush=True)
        count += 1
        if args.count and count >= args.count:
            break
    pubsub.close()
    return 0


def _add_app_commands(sub: Subcommands) -> None:
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            register: Callable[[Subcommands], None] = entry.load()
            register(sub)
        except (ImportError, AttributeError, argparse.ArgumentError) as exc:
            raise SystemExit(
                f"eventbus: the {COMMANDS_GROUP} entry point {entry.name!r} ({entry.value}) failed: {exc}"
            ) from exc


def _command_name(argv: Sequence[str]) -> str | None:
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":  # the one global option that takes a value
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _parser() -> tuple[argparse.ArgumentParser, Subcommands]:
    parser = argparse.ArgumentParser(prog="eventbus", description=(__doc__ or "").partition("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("router", help="dispatch events to Celery tasks")
    p.add_argument("--no-log-writer", action="store_true", help="do not run the log writer in this process")
    p.add_argument("--consumer", help="consumer name in the group (default: host-pid)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("log-writer", help="move event and delivery records into PostgreSQL")
    p.set_defaults(func=cmd_log_writer)

    p = sub.add_parser("publish", help="publish one event")
    p.add_argument("event_type", nargs="?", metavar="EVENT_TYPE", help="the event's name (not with --cloudevent)")
    p.add_argument(
        "--cloudevent",
        metavar="FILE",
        help="publish the structured-mode CloudEvent 1.0 (JSON) in FILE ('-': stdin) instead of EVENT_TYPE/--data",
    )
    p.add_argument("--data", help="the data, a JSON object")
    p.add_argument("--user", help="the user_id the event concerns")
    p.add_argument("--module", help="the publishing module (default: cli)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "requeue-rejected", help="send tasks of unknown handlers back to their queues (malformed ones stay)"
    )
    p.add_argument("--handler", help="only the tasks of this handler (task name)")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent, send nothing")
    p.set_defaults(func=cmd_requeue_rejected)

    p = sub.add_parser("rejected", help="list the task messages workers refused and kept")
    p.add_argument("--handler", help="only the tasks of this handler (task name)")
    p.add_argument("--drop-malformed", action="store_true", help="then delete the malformed ones")
    p.set_defaults(func=cmd_rejected)

    p = sub.add_parser("routes", help="list every subscription")
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser("tail", help="print live events matching PATTERN (default '#')")
    p.add_argument("pattern", nargs="?", default="#")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument(
        "--format",
        choices=("json", "cloudevents"),
        default="json",
        help="print each event as its envelope (json, the default) or as a structured-mode CloudEvent 1.0",
    )
    p.set_defaults(func=cmd_tail)

    from project.contract_commands import add_commands  # contracts lock|check, catalog

    add_commands(sub)
    from project.operations_cli import add_commands as add_operations  # redrive, replay, backfill

    add_operations(sub)
    from project.explorer import add_commands as add_explorer  # explorer (web)

    add_explorer(sub)
    return parser, sub


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventbus`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    # Application commands are loaded only when a command is not one of the dispatcher's:
    # the entry points are installed for every application, and a router or a log writer
    # must not import an application other than the one EVENT_HANDLER_MODULES names.
    parser, sub = _parser()
    if _command_name(argv) not in sub.choices:
        _add_app_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("router", "publish"):  # the commands that make spans
        from project.observability.otel_sdk import configure

        configure(get_settings(), service_name=f"eventbus-{args.command}")
    try:
        return int(args.func(args))
    except EventBusError as exc:
        print(f"eventbus {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
