"""Typed, versioned event contracts: an event type's data declared once as a pydantic model.

A contracts package (the example application's is ``contracts``) declares each event type
it owns, and any module may import it; modules still never import each other::

    @event_bus.event("cosmic.solar_storm.detected", version=1)
    class SolarStormDetected(BaseModel):
        kp_index: int = Field(ge=0, le=9)
        severity: Literal["G1", "G2", "G3", "G4", "G5"]

- ``publish("cosmic.solar_storm.detected", {...})`` and ``publish(SolarStormDetected(...))``
  both validate against the declared model (the latest version for a dict, the instance's
  own version for a model) and stamp that version in the envelope. Invalid data raises
  :class:`~project.errors.InvalidEventData` naming the field. A type with no contract stays
  untyped.
- A handler annotated ``event: Event[SolarStormDetected]`` gets ``event.data`` as a model
  instance, validated on the worker; data that fails is a ``dead`` delivery
  (:class:`~project.errors.ContractViolation`), never retried.
- A breaking change needs a new version. An upcaster registered for N-1 -> N turns the data
  of an event published as N-1 into N's shape before a handler written for N validates it.
  ``eventbus contracts lock`` snapshots the models; ``eventbus contracts check`` fails on a
  breaking change made without a new version.

Contracts are process-wide, like decorator subscriptions: every bus of the process sees the
same ones. Processes that publish dicts import ``EVENT_CONTRACT_MODULES`` on first publish.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from project.errors import ContractViolation, InvalidContract, InvalidEventData

__all__ = [
    "DATASCHEMA_PREFIX",
    "Contract",
    "Contracts",
    "contracts",
    "dataschema_uri",
    "event",
    "handler_model",
    "load_contract_modules",
    "parse_dataschema",
    "upcaster",
]

M = TypeVar("M", bound=type[BaseModel])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: ``dataschema`` of an event with a contract (CloudEvents, the catalog): prefix, type, version.
DATASCHEMA_PREFIX = "urn:eventbus:contract:"


def dataschema_uri(event_type: str, version: int) -> str:
    """The URI naming a contract: ``urn:eventbus:contract:<event_type>:v<version>``."""
    return f"{DATASCHEMA_PREFIX}{event_type}:v{version}"


def parse_dataschema(uri: str) -> tuple[str, int] | None:
    """``(event_type, version)`` of a :func:`dataschema_uri`, or None for any other URI."""
    if not uri.startswith(DATASCHEMA_PREFIX):
        return None
    event_type, _, version = uri[len(DATASCHEMA_PREFIX) :].rpartition(":v")
    if not event_type or not version.isdigit():
        return None
    return event_type, int(version)


@dataclass(frozen=True, slots=True)
class Contract:
    """One version of one event type's data: its pydantic model."""

    event_type: str
    version: int
    model: type[BaseModel] = field(compare=False)

    @property
    def dataschema(self) -> str:
        """The URI naming this contract (:func:`dataschema_uri`)."""
        return dataschema_uri(self.event_type, self.version)

    @property
    def name(self) -> str:
        """The model's import path, ``package.module.ClassName``."""
        return f"{self.model.__module__}.{self.model.__qualname__}"

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the data (pydantic's, validation mode)."""
        return self.model.model_json_schema()


def _field_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "<data>"
        parts.append(f"field {where!r}: {err['msg']}")
    more = exc.error_count() - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class Contracts:
    """Every contract and upcaster of this process, by event type and version."""

    def __init__(self) -> None:
        self._by_type: dict[str, dict[int, Contract]] = {}
        self._by_model: dict[type[BaseModel], Contract] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._lock = threading.Lock()

    # -- declaring ----------------------------------------------------------------------

    def declare(self, event_type: str, model: type[BaseModel], *, version: int = 1) -> Contract:
        """Declare ``model`` as the data of ``event_type`` at ``version``.

        Declaring the same model again (a module imported twice) is a no-op; a re-imported
        module (a reload) replaces its own class.

        Raises:
            InvalidContract: a bad name or version, or another model holds that version.
        """
        from project.envelope import validate_event_name

        try:
            validate_event_name(event_type)
        except ValueError as exc:
            raise InvalidContract(str(exc)) from None
        if not (inspect.isclass(model) and issubclass(model, BaseModel)):
            raise InvalidContract(f"a contract is a pydantic BaseModel subclass, got {model!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidContract(f"contract version must be an int >= 1, got {version!r}")
        contract = Contract(event_type, version, model)
        with self._lock:
            versions = self._by_type.setdefault(event_type, {})
            existing = versions.get(version)
            if existing is not None and existing.model is not model:
                if existing.name != contract.name:
                    raise InvalidContract(
                        f"{event_type!r} version {version} is already declared by {existing.name}; "
                        f"{contract.name} needs another version"
                    )
                self._by_model.pop(existing.model, None)
            previous = self._by_model.get(model)
            if previous is not None and previous != contract:
                raise InvalidContract(
                    f"{contract.name} already declares {previous.event_type!r} version {previous.version}; "
                    "one model per contract"
                )
            versions[version] = contract
            self._by_model[model] = contract
        return contract

    def add_upcaster(self, event_type: str, from_version: int, func: Upcaster) -> None:
        """Register ``func``: data of ``event_type`` at ``from_version`` -> ``from_version + 1``.

        Raises:
            InvalidContract: a bad version, or that step has an upcaster already.
        """
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise InvalidContract(f"an upcaster's from_version must be an int >= 1, got {from_version!r}")
        if not callable(func):
            raise InvalidContract(f"an upcaster must be callable, got {func!r}")
        key = (event_type, from_version)
        with self._lock:
            existing = self._upcasters.get(key)
            if existing is not None and _qualname(existing) != _qualname(func):
                raise InvalidContract(
                    f"{event_type!r} already has an upcaster from version {from_version} ({_qualname(existing)})"
                )
            self._upcasters[key] = func

    # -- reading ------------------------------------------------------------------------

    def get(
        self, event_type: str, version: int | None = None, *, within: Sequence[str] | None = None
    ) -> Contract | None:
        """The contract of ``event_type`` at ``version`` (default: its latest), or None.

        ``within`` (package paths, a bus's ``EVENT_CONTRACT_MODULES``) keeps only the contracts
        declared under them, and the dispatcher's own (``project.*``): two applications in one
        process (a test run) may give the same event name different contracts.
        """
        versions = self._by_type.get(event_type)
        if not versions:
            return None
        if within is not None:
            paths = tuple(within)
            versions = {v: c for v, c in versions.items() if _declared_under(c.model.__module__, paths)}
            if not versions:
                return None
        return versions.get(max(versions) if version is None else version)

    def versions(self, event_type: str) -> list[int]:
        """The declared versions of ``event_type``, oldest first."""
        return sorted(self._by_type.get(event_type, ()))

    def for_model(self, model: type[BaseModel]) -> Contract | None:
        """The contract ``model`` was declared as, or None."""
        return self._by_model.get(model)

    def upcasters(self) -> dict[tuple[str, int], Upcaster]:
        """Every upcaster, by (event type, the version it upcasts from)."""
        return dict(self._upcasters)

    def event_types(self) -> list[str]:
        """Every event type with a contract, in name order."""
        return sorted(t for t, v in self._by_type.items() if v)

    def __iter__(self) -> Iterator[Contract]:
        for event_type in self.event_types():
            yield from (self._by_type[event_type][v] for v in sorted(self._by_type[event_type]))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_type.values())

    # -- validating ---------------------------------------------------------------------

    def outgoing(
        self, event_type: str, data: Mapping[str, Any], *, within: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], int | None]:
        """Validate the data of an event about to be published: ``(data as JSON, version)``.

        The latest version's model validates a dict; a type with no contract (under
        ``within``, see :meth:`get`) passes as it is (version None).

        Raises:
            InvalidEventData: the data does not satisfy the model; the message names the fields.
        """
        contract = self.get(event_type, within=within)
        if contract is None:
            return dict(data), None
        try:
            instance = contract.model.model_validate(data)
        except ValidationError as exc:
            raise InvalidEventData(
                f"data of {event_type!r} does not match its contract {contract.name} "
                f"(version {contract.version}): {_field_errors(exc)}",
                errors=exc.errors(include_url=False),
            ) from None
        return instance.model_dump(mode="json"), contract.version

    def of_instance(self, instance: BaseModel) -> tuple[str, dict[str, Any], int]:
        """``(event_type, data as JSON, version)`` of a model instance being published.

        Raises:
            InvalidEventData: its class is not a declared contract, or it no longer validates
                (a field assigned after construction).
        """
        contract = self.for_model(type(instance))
        if contract is None:
            raise InvalidEventData(
                f"{type(instance).__qualname__} is not a declared event contract: decorate it with "
                "@event_bus.event('scope.name', version=N), or publish(event_type, data)"
            )
        try:  # validated again: model instances allow assignment without validation
            data = contract.model.model_validate(instance.model_dump()).model_dump(mode="json")
        except ValidationError as exc:
            raise InvalidEventData(
                f"{contract.name} instance is not valid for {contract.event_type!r}: {_field_errors(exc)}",
                errors=exc.errors(include_url=False),
            ) from None
        return contract.event_type, data, contract.version

    def upcast(self, event_type: str, data: dict[str, Any], from_version: int, to_version: int) -> dict[str, Any]:
        """Run the upcasters from ``from_version`` up to ``to_version`` on ``data``.

        Raises:
            ContractViolation: a step has no upcaster, or one failed.
        """
        for version in range(from_version, to_version):
            func = self._upcasters.get((event_type, version))
            if func is None:
                raise ContractViolation(
                    f"{event_type!r} published as version {from_version} cannot reach version {to_version}: "
                    f"no upcaster from version {version} (@event_bus.upcaster({event_type!r}, from_version={version}))"
                )
            try:
                data = func(dict(data))
            except Exception as exc:
                raise ContractViolation(
                    f"the upcaster of {event_type!r} from version {version} failed: {exc!r}"
                ) from exc
            if not isinstance(data, dict):
                raise ContractViolation(
                    f"the upcaster of {event_type!r} from version {version} returned {type(data).__name__}, not a dict"
                )
        return data

    def incoming(self, envelope: Mapping[str, Any], model: type[BaseModel]) -> tuple[BaseModel, dict[str, Any]]:
        """Turn a received envelope's data into ``model`` (upcasting first): ``(instance, data)``.

        The envelope's ``version`` is the one it was published as. An envelope with none
        (published untyped, or before the contract existed) is taken as it is if it fits
        ``model``, else as the oldest declared version, upcast. ``data`` is the (upcast) dict.

        Raises:
            ContractViolation: the data cannot become ``model``; the message says why.
        """
        event_type = str(envelope.get("event_type"))
        data = envelope.get("data")
        if not isinstance(data, dict):
            raise ContractViolation(f"event {envelope.get('event_id')} has no data object")
        target = self.for_model(model)
        published = envelope.get("version")
        if target is not None and target.event_type == event_type:
            if not isinstance(published, int):
                # Published untyped: the handler's own version if the data fits it, else
                # the oldest declared version (events from before the contract existed).
                try:
                    return model.model_validate(data), data
                except ValidationError as exc:
                    oldest = self.versions(event_type)[0]
                    if oldest >= target.version:
                        raise self._violation(envelope, model, "no version", exc) from None
                    try:
                        upcast = self.upcast(event_type, data, oldest, target.version)
                        return model.model_validate(upcast), upcast
                    except (ContractViolation, ValidationError) as second:
                        raise ContractViolation(
                            f"{self._violation(envelope, model, 'no version', exc)}; nor as version {oldest}, "
                            f"upcast: {_field_errors(second) if isinstance(second, ValidationError) else second}"
                        ) from None
            if published < target.version:
                data = self.upcast(event_type, data, published, target.version)
        try:
            return model.model_validate(data), data
        except ValidationError as exc:
            shown = f"version {published}" if isinstance(published, int) else "no version"
            raise self._violation(envelope, model, shown, exc) from None

    @staticmethod
    def _violation(
        envelope: Mapping[str, Any], model: type[BaseModel], shown: str, exc: ValidationError
    ) -> ContractViolation:
        return ContractViolation(
            f"event {envelope.get('event_id')} ({envelope.get('event_type')!r}, {shown}) does not match "
            f"{model.__module__}.{model.__qualname__}: {_field_errors(exc)}"
        )


@lru_cache(maxsize=1024)
def _declared_under(module: str, paths: tuple[str, ...]) -> bool:
    return (
        module == "project"
        or module.startswith("project.")
        or any(module == p or module.startswith(p + ".") for p in paths)
    )


def _qualname(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


#: The process's contracts (``event_bus.event`` and :func:`event` declare here).
contracts = Contracts()


def event(event_type: str, *, version: int = 1) -> Callable[[M], M]:
    """Class decorator: declare the model as the data of ``event_type`` at ``version``."""

    def decorate(model: M) -> M:
        contracts.declare(event_type, model, version=version)
        return model

    return decorate


def upcaster(event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Function decorator: the data of ``event_type`` at ``from_version`` -> the next version."""

    def decorate(func: Upcaster) -> Upcaster:
        contracts.add_upcaster(event_type, from_version, func)
        return func

    return decorate


_loaded: set[str] = set()


def load_contract_modules(paths: Sequence[str], *, required: bool = True) -> None:
    """Import the contracts packages ``paths`` (with their submodules), once each.

    With ``required=False`` a package that does not exist is skipped (the default setting
    names ``contracts``, which an application may not have).

    Raises:
        InvalidContract: a package cannot be imported.
    """
    import pkgutil

    for path in paths:
        if path in _loaded:
            continue
        try:
            package = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if not required and exc.name == path:
                _loaded.add(path)
                continue
            raise InvalidContract(f"EVENT_CONTRACT_MODULES names {path!r}, which cannot be imported: {exc}") from exc
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{path}."):
            importlib.import_module(info.name)
        _loaded.add(path)


def handler_model(handler: Callable[..., Any]) -> type[BaseModel] | None:
    """The model of a handler annotated ``event: Event[Model]``, or None (it gets the dict).

    Raises:
        InvalidContract: the annotation names ``Event[X]`` where X is not a pydantic model.
    """
    from project.event import Event

    func = getattr(handler, "__func__", handler)
    try:
        params = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    annotation: Any = params[0].annotation
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        try:
            hints = typing.get_type_hints(func)
        except Exception as exc:
            if "Event[" not in annotation.replace(" ", ""):
                return None  # e.g. a plain Event imported under TYPE_CHECKING: the dict, as always
            raise InvalidContract(
                f"cannot resolve the annotation {annotation!r} of handler {_qualname(func)} ({exc}): "
                "import its contract model at run time, not only under TYPE_CHECKING"
            ) from exc
        annotation = hints.get(params[0].name, annotation)
    if typing.get_origin(annotation) is not Event:
        return None
    (arg,) = typing.get_args(annotation)
    if inspect.isclass(arg) and issubclass(arg, BaseModel):
        return arg
    if arg is Any or typing.get_origin(arg) is dict or arg is dict:
        return None
    raise InvalidContract(f"handler {_qualname(func)} is annotated Event[{arg!r}]: use a pydantic model")
