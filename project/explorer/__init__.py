"""The events explorer: a small web application on the record (``eventbus explorer``).

Server-rendered pages (Tornado, the server Flower runs on) over ``events_log`` and
``event_deliveries``: the latest events with filters, an event with its deliveries and its
causal chain, a user's chains, the problems (dead and rejected deliveries, with a redrive
button, and the router's dead-letter stream) and an overview with charts. It binds
127.0.0.1 by default and asks for basic auth (``EXPLORER_USER``, ``EXPLORER_PASSWORD``).

Importing this package imports no web framework: the command does, when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from project.cli import Subcommands

__all__ = ["add_commands"]


def _cmd_explorer(args: argparse.Namespace) -> int:
    from project.explorer.app import serve
    from project.settings import get_settings

    serve(get_settings(), args.address, args.port)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Add ``eventbus explorer`` to the CLI's subcommands."""
    p = sub.add_parser("explorer", help="serve the events explorer (web) on EXPLORER_ADDRESS:EXPLORER_PORT")
    p.add_argument("--address", help="the address to bind (default: EXPLORER_ADDRESS, 127.0.0.1)")
    p.add_argument("--port", type=int, help="the port (default: EXPLORER_PORT, 5556)")
    p.set_defaults(func=_cmd_explorer)
