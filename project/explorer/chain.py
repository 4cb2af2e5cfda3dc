"""An event's place in its chain: the causal tree from the root through every handler.

An event's children are the events whose ``causation_id`` is it. Each child is attributed to
the handler that published it: a handler's n-th published event has the id
``derived_event_id(<its delivery's task id>, n)`` (:mod:`project.context`), so the tree runs
event → delivery (handler) → published event → ... The ``module.error`` report of a delivery
that gave up hangs under that delivery too (its id derives from the delivery's in the same
way, :mod:`project.delivery`). A child whose id derives from none of
its parent's deliveries (published by code that was not running a delivery) hangs under the
event itself; a replay's copy hangs under its original.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from project.context import derived_event_id
from project.delivery import MODULE_ERROR
from project.explorer.queries import DeliveryRow, EventRow
from project.messages import delivery_task_id

__all__ = ["Chain", "Line", "build_chain"]


@dataclass(slots=True)
class Line:
    """One line of the tree as a page draws it: an event, or a delivery of the event above.

    ``took_s`` is how long the step took: for a delivery, from its event's publish to the
    delivery's last update (its end, once it has ended); for an event, from its parent's
    publish to its own.
    """

    kind: Literal["event", "delivery"]
    depth: int
    event: EventRow
    delivery: DeliveryRow | None = None
    took_s: float | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        """Whether this line is a failed step."""
        return self.delivery is not None and self.delivery.failed

    @property
    def anchor(self) -> str:
        """The element id a link to this line targets."""
        if self.delivery is not None:
            return f"d{self.delivery.id}"
        return f"e{self.event.id}"


@dataclass(slots=True)
class Chain:
    """A chain's tree as lines, its failed steps (the first thing a page shows), and counts."""

    lines: list[Line] = field(default_factory=list)
    failed: list[Line] = field(default_factory=list)
    events: int = 0
    deliveries: int = 0
    truncated: bool = False

    @property
    def root(self) -> EventRow | None:
        """The chain's first event."""
        return self.lines[0].event if self.lines else None


def build_chain(events: Iterable[EventRow], deliveries: Iterable[DeliveryRow], *, truncated: bool = False) -> Chain:
    """Arrange one chain's events and their deliveries as a tree, flattened in reading order.

    Events whose parent is not among ``events`` (the chain was cut at a limit, or the parent
    is not on record yet) start trees of their own, after the root's.
    """
    events = list(events)
    by_id = {e.event_id: e for e in events}
    steps: dict[str, list[DeliveryRow]] = defaultdict(list)
    for d in deliveries:
        steps[d.event_id].append(d)
    children: dict[str, list[EventRow]] = defaultdict(list)
    replays: dict[str, list[EventRow]] = defaultdict(list)
    tops: list[EventRow] = []
    for e in events:
        if e.replay_of is not None and e.replay_of in by_id:
            replays[e.replay_of].append(e)
        elif e.causation_id is not None and e.causation_id in by_id and e.causation_id != e.event_id:
            children[e.causation_id].append(e)
        else:
            tops.append(e)
    chain = Chain(events=len(events), deliveries=sum(len(v) for v in steps.values()), truncated=truncated)
    seen: set[str] = set()

    def visit(event: EventRow, depth: int, took_s: float | None, note: str = "") -> None:
        if event.event_id in seen:  # a malformed record that loops: draw each event once
            return
        seen.add(event.event_id)
        chain.lines.append(Line("event", depth, event, took_s=took_s, note=note))
        kids = children.get(event.event_id, [])
        by_delivery, reports = _attribute(event, steps.get(event.event_id, []), kids)
        for d in steps.get(event.event_id, []):
            line = Line("delivery", depth + 1, event, d, took_s=(d.updated_at - event.occurred_at).total_seconds())
            chain.lines.append(line)
            if line.failed:
                chain.failed.append(line)
            for kid in by_delivery.get(d.id, []):
                visit(kid, depth + 2, _gap(event, kid), note="its failure report" if kid.event_id in reports else "")
        for kid in by_delivery.get(None, []):
            visit(kid, depth + 1, _gap(event, kid), note="published outside a handler run")
        for copy in replays.get(event.event_id, []):
            visit(copy, depth + 1, _gap(event, copy), note=f"replay of {event.event_id}")

    for top in sorted(tops, key=lambda e: (e.hops, e.occurred_at, e.id)):
        visit(top, 0, None)
    for e in events:  # only in a record whose causes loop: no top leads to them
        visit(e, 0, None)
    return chain


def _gap(parent: EventRow, child: EventRow) -> float:
    return (child.occurred_at - parent.occurred_at).total_seconds()


def _attribute(
    event: EventRow, deliveries: list[DeliveryRow], kids: list[EventRow]
) -> tuple[dict[int | None, list[EventRow]], set[str]]:
    """Which delivery of ``event`` published each of ``kids`` (None: none of them did), and
    which of the kids are a delivery's failure report."""
    if not kids:
        return {}, set()
    publisher: dict[str, int] = {}
    reports: set[str] = set()
    for d in deliveries:
        task_id = d.task_id or delivery_task_id(event.event_id, d.handler)
        # A handler run publishes its events as n = 1, 2, ...: no run published more than
        # all of the event's children.
        for n in range(1, len(kids) + 1):
            publisher[derived_event_id(task_id, n)] = d.id
        report = derived_event_id(f"{task_id}/{MODULE_ERROR}", 1)
        publisher[report] = d.id
        reports.add(report)
    found: dict[int | None, list[EventRow]] = defaultdict(list)
    for kid in sorted(kids, key=lambda e: (e.occurred_at, e.id)):
        found[publisher.get(kid.event_id)].append(kid)
    return found, reports
