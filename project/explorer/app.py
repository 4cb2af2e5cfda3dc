"""The explorer's Tornado application and its server: routes, listening, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import tornado.httpserver
import tornado.web

from project.errors import EventBusError
from project.explorer import pages
from project.explorer.resources import Explorer
from project.settings import Settings

__all__ = ["make_app", "serve"]

log = logging.getLogger("eventbus.explorer")

TEMPLATES = Path(__file__).resolve().parent / "templates"


def make_app(explorer: Explorer) -> tornado.web.Application:
    """The application: every page, behind basic auth (``EXPLORER_USER``/``EXPLORER_PASSWORD``)."""
    routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Explorer]]] = [
        (r"/", pages.OverviewPage, {"explorer": explorer}),
        (r"/events", pages.EventsPage, {"explorer": explorer}),
        (r"/events/([0-9a-fA-F-]{36})", pages.EventPage, {"explorer": explorer}),
        (r"/users", pages.UserLookup, {"explorer": explorer}),
        (r"/users/([^/]+)", pages.UserPage, {"explorer": explorer}),
        (r"/problems", pages.ProblemsPage, {"explorer": explorer}),
        (r"/problems/redrive", pages.RedrivePage, {"explorer": explorer}),
        (r"/healthz", pages.Health, {"explorer": explorer}),
    ]
    return tornado.web.Application(
        routes,  # type: ignore[arg-type]
        template_path=str(TEMPLATES),
        xsrf_cookies=True,  # the redrive form: basic auth alone would let another site post it
        default_handler_class=pages.NotFound,
        default_handler_args={"explorer": explorer},
        compiled_template_cache=True,
    )


def serve(settings: Settings, address: str | None = None, port: int | None = None) -> None:
    """Serve the explorer until SIGTERM or SIGINT (``eventbus explorer``).

    Raises:
        EventBusError: ``EXPLORER_PASSWORD`` is empty or the default.
    """
    address = address or settings.explorer_address
    port = port or settings.explorer_port
    # The default password is in the README for everyone to read, and the explorer can send
    # deliveries again: it does not start behind it (as Flower does not).
    if settings.explorer_password.get_secret_value() in ("", "change-me"):
        raise EventBusError("set EXPLORER_PASSWORD (not the default 'change-me'); `make run` makes one in .run/env")

    async def main() -> None:
        explorer = Explorer(settings)
        server = tornado.httpserver.HTTPServer(make_app(explorer), xheaders=False)
        server.listen(port, address=address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("explorer listening on http://%s:%d (prefix %r)", address, port, settings.events_prefix)
        await stop.wait()
        log.info("explorer stopping")
        server.stop()
        await server.close_all_connections()
        explorer.close()

    asyncio.run(main())
