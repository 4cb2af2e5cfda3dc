"""The router of ``make run``, noting when it read each batch and when each dispatch script ran.

``python -m bench.router_probe <the arguments of python -m project.cli>`` runs exactly what
``python -m project.cli`` runs. With ``BENCH_STAGES_DIR`` set (the end-to-end stack of
:mod:`bench.stack` sets it), it first wraps two methods of :class:`project.router.Router`,
from the outside, for :mod:`bench.latency`'s stage breakdown: ``dispatch`` (handed each batch
the moment ``XREADGROUP`` returned it) and ``_call`` (one dispatch script call: the LPUSHes
and the XACKs). Each script call appends one line to ``router-<pid>.txt`` in that directory::

    <batch read> <script sent> <script returned> <first entry id> <last entry id>

in seconds since the epoch; a call's entries are consecutive entries of the stream. That is
three clock readings and one line written per script call; no Redis command, and
``project/router.py`` is not changed. If the router no longer has those methods, it runs
unwrapped and says so (the stage breakdown then lacks the router's stages).

It runs with the ``EVENTS_PREFIX`` it is given, so it does not import :mod:`bench.harness`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from project import router as router_module
from project.cli import main

__all__ = ["install"]

log = logging.getLogger("bench.router_probe")


def install(directory: Path) -> bool:
    """Wrap the router's batch and script calls to note their times in ``directory``; False if it cannot."""
    router_cls: Any = router_module.Router
    dispatch, call = getattr(router_cls, "dispatch", None), getattr(router_cls, "_call", None)
    if dispatch is None or call is None:
        log.warning("bench.router_probe: Router has no dispatch/_call; running without stage stamps")
        return False
    out = (directory / f"router-{os.getpid()}.txt").open("a", buffering=1)
    read_at = [0.0]  # only the router's own thread dispatches

    def timed_dispatch(self: Any, entries: Sequence[tuple[Any, Any]]) -> Any:
        read_at[0] = time.time()
        return dispatch(self, entries)

    def timed_call(self: Any, items: list[Any]) -> Any:
        sent = time.time()
        reply = call(self, items)
        returned = time.time()
        if items:
            out.write(f"{read_at[0]:.6f} {sent:.6f} {returned:.6f} {items[0].eid} {items[-1].eid}\n")
        return reply

    router_cls.dispatch = timed_dispatch
    router_cls._call = timed_call
    return True


if __name__ == "__main__":
    stages = os.environ.get("BENCH_STAGES_DIR")
    if stages:
        install(Path(stages))
    sys.exit(main())
