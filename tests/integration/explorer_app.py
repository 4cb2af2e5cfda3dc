"""A handler that fails until the test fixes it, loaded beside the example application's.

``EVENT_HANDLER_MODULES=handlers,tests.integration.explorer_app``: at the end of the demo
chain, ``synthesis.completed`` reaches :func:`flaky` on the queue ``explorer``. It raises
while the Redis flag :func:`fixed_key` is unset; with no retry allowed, its delivery is
``dead`` at once. The explorer test sets the flag, then redrives it from the problems page.
"""

from __future__ import annotations

from project.event import Event
from project.events import event_bus

ERROR = "the flaky handler is broken"


def fixed_key(prefix: str) -> str:
    """The flag that fixes the handler, under the test's prefix."""
    return f"{prefix}:test:explorer-fixed"


@event_bus.subscribe("synthesis.completed", queue="explorer", max_retries=0)
def flaky(event: Event) -> None:
    """Fails until the flag is set."""
    if not event_bus.sync_client().exists(fixed_key(event_bus.keys.prefix)):
        raise RuntimeError(ERROR)
