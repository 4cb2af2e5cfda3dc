"""What the catalog shows, gathered once from a bus: event types, contracts, publishers, handlers."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from project.bus import EventBus
from project.contracts import Contract, Contracts, contracts
from project.delivery import MODULE_ERROR
from project.envelope import validate_event_name
from project.errors import InvalidEventName
from project.patterns import PatternTrie
from project.registry import Subscription

__all__ = ["DISPATCHER", "Catalog", "Channel", "Handler", "Publisher", "Upcast", "collect"]

#: The publisher name of the dispatcher's own events (``module.error``, when a delivery gives up).
DISPATCHER = "eventbus"


@dataclass(frozen=True, slots=True)
class Upcast:
    """An upcaster: data of ``from_version`` -> ``from_version + 1``."""

    from_version: int
    function: str  # module.qualname


@dataclass(frozen=True, slots=True)
class Handler:
    """A subscription as it handles one channel: its matching patterns and effective policy."""

    name: str  # the Celery task name
    module: str | None
    queue: str
    patterns: tuple[str, ...]  # those of its patterns that match this channel
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    time_limit_s: float
    soft_time_limit_s: float
    model: str | None  # the contract model it is annotated with, or None: it gets the envelope dict
    model_version: int | None  # that model's contract version
    summary: str  # the first line of its docstring


@dataclass(frozen=True, slots=True)
class Publisher:
    """A module that declares the event types it publishes (``BaseModule.publishes``)."""

    name: str
    queue: str | None
    cls: str  # module.qualname; the dispatcher's is its delivery task
    publishes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Channel:
    """An event type (``is_pattern`` False) or a subscription pattern that matches no known one."""

    address: str
    is_pattern: bool
    contracts: tuple[Contract, ...]  # oldest first; empty: an untyped event type
    upcasters: tuple[Upcast, ...]
    publishers: tuple[str, ...]
    handlers: tuple[Handler, ...]

    @property
    def description(self) -> str:
        """The docstring of the latest version's model, or ''."""
        if not self.contracts:
            return ""
        doc = self.contracts[-1].model.__dict__.get("__doc__")
        return inspect.cleandoc(doc) if isinstance(doc, str) else ""


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every channel (event types in name order, then unmatched patterns) and every publisher."""

    channels: tuple[Channel, ...]
    publishers: tuple[Publisher, ...]
    contract_modules: tuple[str, ...]
    handler_modules: tuple[str, ...]

    def channel(self, address: str) -> Channel | None:
        """The channel of an event type or pattern, or None."""
        return next((c for c in self.channels if c.address == address), None)


def _summary(obj: object) -> str:
    doc = inspect.getdoc(getattr(obj, "__func__", obj))
    return doc.strip().splitlines()[0] if doc else ""


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _handler(bus: EventBus, registry: Contracts, sub: Subscription, patterns: Sequence[str]) -> Handler:
    # The same effective limits as the delivery task's (project.delivery.route_task).
    contract = None if sub.model is None else registry.for_model(sub.model)
    hard_s = float(sub.time_limit_s or bus.settings.delivery_time_limit_s)
    return Handler(
        name=sub.name,
        module=sub.module,
        queue=sub.queue,
        patterns=tuple(sorted(patterns)),
        max_retries=sub.max_retries,
        backoff_s=sub.backoff_s,
        backoff_max_s=sub.backoff_max_s,
        time_limit_s=hard_s,
        soft_time_limit_s=float(sub.soft_time_limit_s or hard_s * 0.9),
        model=None if sub.model is None else _qualname(sub.model),
        model_version=None if contract is None else contract.version,
        summary=_summary(sub.handler),
    )


def collect(bus: EventBus, registry: Contracts = contracts) -> Catalog:
    """The catalog of ``bus`` as loaded: call ``bus.load_modules()`` and load the contracts first.

    Contracts are those declared under the bus's ``EVENT_CONTRACT_MODULES`` and the
    dispatcher's own (``module.error``). Event types are the declared ones, those a module
    says it publishes and the exact (wildcard-free) subscription patterns; a pattern that
    matches none of them gets a channel of its own.

    Raises:
        InvalidEventName: a module's ``publishes`` names something that is no event name.
    """
    within = bus.settings.event_contract_modules
    declared = [c for c in registry if registry.get(c.event_type, c.version, within=within) is c]
    publishers = [
        Publisher(name=m.name, queue=m.queue, cls=_qualname(type(m)), publishes=tuple(sorted(set(m.publishes))))
        for m in bus.modules.values()
        if m.publishes
    ]
    for publisher in publishers:
        for event_type in publisher.publishes:
            try:
                validate_event_name(event_type)
            except InvalidEventName as exc:
                raise InvalidEventName(f"{publisher.cls}.publishes: {exc}") from None
    if registry.get(MODULE_ERROR, within=within) is not None:
        publishers.append(Publisher(DISPATCHER, None, "project.delivery.DeliveryTask", (MODULE_ERROR,)))
    publishers.sort(key=lambda p: p.name)

    subscriptions = list(bus.registry)
    trie: PatternTrie[tuple[str, str]] = PatternTrie()
    for sub in subscriptions:
        for pattern in sub.patterns:
            trie.insert(pattern, (sub.name, pattern))
    exact = {p for sub in subscriptions for p in sub.patterns if "*" not in p and "#" not in p}
    event_types = sorted(
        {c.event_type for c in declared} | {t for p in publishers for t in p.publishes} | exact,
    )
    by_name = {sub.name: sub for sub in subscriptions}
    upcasters = registry.upcasters()
    channels: list[Channel] = []
    matched: set[tuple[str, str]] = set()
    for event_type in event_types:
        hits = trie.match(event_type)
        matched |= hits
        channels.append(
            Channel(
                address=event_type,
                is_pattern=False,
                contracts=tuple(c for c in declared if c.event_type == event_type),
                upcasters=tuple(
                    Upcast(v, _qualname(upcasters[(t, v)])) for t, v in sorted(upcasters) if t == event_type
                ),
                publishers=tuple(p.name for p in publishers if event_type in p.publishes),
                handlers=_handlers(bus, registry, by_name, hits),
            )
        )
    unmatched: dict[str, set[tuple[str, str]]] = {}
    for sub in subscriptions:
        for pattern in sub.patterns:
            if (sub.name, pattern) not in matched:
                unmatched.setdefault(pattern, set()).add((sub.name, pattern))
    for pattern in sorted(unmatched):
        channels.append(Channel(pattern, True, (), (), (), _handlers(bus, registry, by_name, unmatched[pattern])))
    return Catalog(
        channels=tuple(channels),
        publishers=tuple(publishers),
        contract_modules=tuple(bus.settings.event_contract_modules),
        handler_modules=tuple(bus.settings.event_handler_modules),
    )


def _handlers(
    bus: EventBus, registry: Contracts, by_name: dict[str, Subscription], hits: set[tuple[str, str]]
) -> tuple[Handler, ...]:
    names = sorted({name for name, _ in hits})
    return tuple(_handler(bus, registry, by_name[n], [p for name, p in hits if name == n]) for n in names)
