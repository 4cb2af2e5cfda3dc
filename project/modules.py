"""Application modules: a base class that subscribes in ``initialize()``, and their loading."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from project.errors import EventBusError
from project.registry import Subscription

if TYPE_CHECKING:
    from project.bus import EventBus

__all__ = ["BaseModule", "load_modules"]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class BaseModule:
    """Base class of an application module.

    Subclasses override ``async def initialize(self)``, call ``await super().initialize()``
    first, and subscribe there: ``self.subscribe("user.birth_data.updated", self.recalculate)``.
    Every concrete subclass found in ``EVENT_HANDLER_MODULES`` is created once per process
    (router and worker alike) and initialized once, so a bound method used as a handler
    resolves to the same instance in every worker process.

    Class attributes: ``name`` (default: the class name in snake_case without ``Module``),
    ``queue`` (default: ``name``), ``publishes`` (the event types it publishes, for the
    catalog: ``eventbus catalog``). Set ``abstract = True`` on a base class that must not be
    instantiated.
    """

    name: ClassVar[str]
    queue: ClassVar[str]
    publishes: ClassVar[tuple[str, ...]] = ()
    abstract: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "abstract" not in cls.__dict__:
            cls.abstract = False
        if "name" not in cls.__dict__:
            base = cls.__name__[: -len("Module")] if cls.__name__.endswith("Module") else cls.__name__
            cls.name = _snake(base) or _snake(cls.__name__)
        if "queue" not in cls.__dict__:
            cls.queue = cls.name

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.initialized = False

    async def initialize(self) -> None:
        """Set the module up; subclasses subscribe here after calling ``super().initialize()``.

        Raises:
            EventBusError: the module was initialized already.
        """
        if self.initialized:
            raise EventBusError(f"module {self.name!r} is already initialized")
        self.initialized = True

    def subscribe(self, pattern: str | Sequence[str], handler: Callable[..., Any], **options: Any) -> Subscription:
        """Subscribe ``handler`` on this module's queue; see :meth:`EventBus.subscribe`."""
        options.setdefault("queue", self.queue)
        result: Subscription = self.bus.subscribe(pattern, handler, **options)
        return result

    async def publish(
        self, event_type: str | BaseModel, data: Mapping[str, Any] | None = None, *, user_id: Any = None
    ) -> str:
        """Publish an event as this module; see :meth:`EventBus.publish`."""
        return await self.bus.publish(event_type, data, user_id=user_id, module=self.name)

    def publish_sync(
        self, event_type: str | BaseModel, data: Mapping[str, Any] | None = None, *, user_id: Any = None
    ) -> str:
        """Publish an event as this module from synchronous code."""
        return self.bus.publish_sync(event_type, data, user_id=user_id, module=self.name)


def _import_tree(path: str) -> None:
    try:
        package = importlib.import_module(path)
    except ImportError as exc:
        raise EventBusError(f"EVENT_HANDLER_MODULES names {path!r}, which cannot be imported: {exc}") from exc
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{path}."):
        importlib.import_module(info.name)


def _subclasses(cls: type[BaseModule]) -> list[type[BaseModule]]:
    found: list[type[BaseModule]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def load_modules(bus: EventBus, paths: Sequence[str]) -> list[BaseModule]:
    """Import every path (packages with their submodules) and initialize their modules once.

    Decorator subscriptions register on import; each concrete :class:`BaseModule` subclass
    defined under one of ``paths`` is created once and its ``initialize()`` awaited.
    """
    for path in paths:
        _import_tree(path)
    # Decorators ran when their modules were first imported, perhaps for another bus.
    bus.apply_declarations(paths)
    for cls in _subclasses(BaseModule):
        if cls.abstract or cls in bus.modules:
            continue
        if not any(cls.__module__ == p or cls.__module__.startswith(p + ".") for p in paths):
            continue
        instance = cls(bus)
        asyncio.run(instance.initialize())
        if not instance.initialized:
            raise EventBusError(f"{cls.__qualname__}.initialize() did not call super().initialize()")
        bus.modules[cls] = instance
    return list(bus.modules.values())
