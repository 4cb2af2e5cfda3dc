"""Subscriptions: who handles which events, on which queue, with which retry policy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from project.errors import DuplicateHandler
from project.patterns import PatternTrie

__all__ = ["Declaration", "Registry", "Subscription", "declarations", "declare"]


@dataclass(frozen=True, slots=True)
class Subscription:
    """One handler, the patterns it listens to, and how its Celery task runs."""

    name: str  # the Celery task name, unique: module.qualname of the handler
    patterns: tuple[str, ...]
    handler: Callable[[dict[str, Any]], Any] = field(compare=False)
    queue: str
    module: str | None
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    time_limit_s: float | None = None
    soft_time_limit_s: float | None = None
    # The contract model of a handler annotated ``event: Event[Model]`` (project.contracts):
    # its events are validated (and upcast) into it on the worker. None: the handler gets dicts.
    model: type[BaseModel] | None = field(default=None, compare=False)


class Registry:
    """All subscriptions of this process, and the trie that matches event names to them."""

    def __init__(self) -> None:
        self._by_name: dict[str, Subscription] = {}
        self._trie: PatternTrie[str] = PatternTrie()
        self._lock = threading.Lock()
        self._match_cached = lru_cache(maxsize=4096)(self._match_uncached)

    def add(self, sub: Subscription) -> None:
        """Register ``sub``; raise :class:`DuplicateHandler` if its name is taken."""
        with self._lock:
            existing = self._by_name.get(sub.name)
            if existing is not None:
                raise DuplicateHandler(
                    f"handler {sub.name!r} is already subscribed to {list(existing.patterns)}; "
                    "subscribe it once, with every pattern it needs (subscribe(['a.b', 'c.#'], ...))"
                )
            for pattern in sub.patterns:
                self._trie.insert(pattern, sub.name)
            self._by_name[sub.name] = sub
            self._match_cached.cache_clear()

    def get(self, name: str) -> Subscription | None:
        """Return the subscription whose task is called ``name``."""
        return self._by_name.get(name)

    def match(self, event_type: str) -> tuple[Subscription, ...]:
        """Every subscription that matches ``event_type``, once each, in name order."""
        return self._match_cached(event_type)

    def _match_uncached(self, event_type: str) -> tuple[Subscription, ...]:
        return tuple(self._by_name[name] for name in sorted(self._trie.match(event_type)))

    def __iter__(self) -> Iterator[Subscription]:
        return iter(sorted(self._by_name.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._by_name)


@dataclass(frozen=True, slots=True)
class Declaration:
    """A subscription made by decorator, as written: applied to every bus that loads its module.

    A decorator runs once, when its module is first imported, and registers on the bus it
    names; a bus made later (a test's, a tool's) that loads the same handler modules gets the
    subscription from here, with its own settings.
    """

    patterns: tuple[str, ...]
    handler: Callable[..., Any] = field(compare=False)
    options: tuple[tuple[str, Any], ...]

    @property
    def module(self) -> str:
        """The module the handler is defined in."""
        return str(getattr(self.handler, "__module__", ""))


_declarations: list[Declaration] = []


def declare(declaration: Declaration) -> None:
    """Remember a decorator subscription for every bus (process-wide, in import order)."""
    _declarations.append(declaration)


def declarations(paths: tuple[str, ...] | list[str]) -> list[Declaration]:
    """The decorator subscriptions made in the modules under ``paths``."""
    return [d for d in _declarations if any(d.module == p or d.module.startswith(p + ".") for p in paths)]
