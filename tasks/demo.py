"""``eventbus demo``: create a user with birth data, publish, and watch the chain complete.

The command is the application's: the ``eventbus`` CLI finds it through the
``eventbus.commands`` entry point (``pyproject.toml``), which names :func:`register`.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from project.bus import EventBus
from project.events import event_bus
from project.tables import event_deliveries, events_log
from tasks.tables import birth_data, users

if TYPE_CHECKING:
    from project.cli import Subcommands

__all__ = ["CHAIN", "chain_state", "create_demo_user", "register", "run_demo"]

CHAIN = ("user.birth_data.updated", "module.profile.calculated", "synthesis.completed")


def create_demo_user(engine: sa.Engine, name: str, born_at: datetime) -> int:
    """Insert a user and their birth data; return the user's id."""
    with engine.begin() as conn:
        user_id = int(conn.execute(sa.insert(users).values(name=name).returning(users.c.id)).scalar_one())
        conn.execute(sa.insert(birth_data).values(user_id=user_id, born_at=born_at, place="Paris"))
    return user_id


def chain_state(engine: sa.Engine, correlation_id: str) -> tuple[list[Any], list[Any]]:
    """The events of the chain started by ``correlation_id``, and their deliveries."""
    with engine.connect() as conn:
        events = list(
            conn.execute(
                sa.select(events_log.c.event_id, events_log.c.event_type, events_log.c.hops)
                .where(events_log.c.correlation_id == correlation_id)
                .order_by(events_log.c.hops, events_log.c.occurred_at)
            )
        )
        deliveries = list(
            conn.execute(
                sa.select(event_deliveries.c.event_id, event_deliveries.c.handler, event_deliveries.c.status).where(
                    event_deliveries.c.event_id.in_([e.event_id for e in events])
                )
            )
        )
    return events, deliveries


def run_demo(bus: EventBus, engine: sa.Engine, wait_s: float, out: Any) -> int:
    """Run the demo; 0 once the whole chain is logged and every delivery succeeded."""
    born_at = datetime(1990, 7, 14, 6, 30, tzinfo=UTC)
    user_id = create_demo_user(engine, "Demo User", born_at)
    print(f"created user {user_id}, born {born_at.isoformat()} in Paris", file=out)
    root = bus.publish_sync("user.birth_data.updated", {"user_id": user_id}, module="demo")
    print(f"published user.birth_data.updated {root}", file=out)
    if wait_s <= 0:
        return 0
    deadline = time.monotonic() + wait_s
    while True:
        events, deliveries = chain_state(engine, root)
        types = [e.event_type for e in events]
        done = all(t in types for t in CHAIN) and deliveries and all(d.status == "succeeded" for d in deliveries)
        if done:
            for e in events:
                handlers = [f"{d.handler} {d.status}" for d in deliveries if d.event_id == e.event_id]
                print(f"  hop {e.hops}: {e.event_type}  ->  {', '.join(handlers) or 'no subscribers'}", file=out)
            print("the chain is complete: every delivery succeeded", file=out)
            return 0
        if time.monotonic() > deadline:
            print(f"timed out after {wait_s}s: events so far {types}; deliveries "
                  f"{[(d.handler, d.status) for d in deliveries]}. Are the router and the workers running?",
                  file=out)  # fmt: skip
            return 1
        time.sleep(0.2)


def _command(args: argparse.Namespace) -> int:
    engine = sa.create_engine(event_bus.settings.database_url)
    try:
        return run_demo(event_bus, engine, args.wait_s, sys.stdout)
    finally:
        engine.dispose()


def register(commands: Subcommands) -> None:
    """Add the ``demo`` command to the ``eventbus`` CLI (the ``eventbus.commands`` entry point)."""
    p = commands.add_parser("demo", help="create a user, publish user.birth_data.updated, watch the chain")
    p.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the chain (0: do not)")
    p.set_defaults(func=_command)
