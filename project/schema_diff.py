"""Which changes to a JSON Schema accept less than before (breaking) or more (a notice).

:func:`diff` compares two pydantic JSON Schemas of one model, the locked one and the current
one, field by field: ``$ref``/``$defs`` are resolved, and nested objects, array items,
``anyOf``/``oneOf`` alternatives and ``additionalProperties`` maps are compared where they
sit. Each old alternative of a union is matched with the new alternative that takes it best.
:mod:`project.evolution` applies it to every locked contract version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BREAKING",
    "FIELD_ADDED",
    "FIELD_OPTIONAL",
    "FIELD_REMOVED",
    "NOTICE",
    "REQUIRED_ADDED",
    "TYPE_NARROWED",
    "TYPE_WIDENED",
    "Change",
    "diff",
]

BREAKING: Literal["breaking"] = "breaking"
NOTICE: Literal["notice"] = "notice"

FIELD_REMOVED = "field removed or renamed"
TYPE_NARROWED = "type narrowed"
REQUIRED_ADDED = "new required field"
FIELD_ADDED = "optional field added"
FIELD_OPTIONAL = "field made optional"
TYPE_WIDENED = "type widened"

Schema = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: ``path`` is the field, dotted ("signs.*" a map's values, "tags[]" a
    list's items, "signs.<key>" a map's keys); "" is the whole schema."""

    severity: Literal["breaking", "notice"]
    path: str
    rule: str
    message: str


def diff(old: Schema, new: Schema) -> list[Change]:
    """Every change from the ``old`` schema to the ``new`` one, in the order found."""
    changes = _Changes()
    _SchemaPair(old, new).compare(old, new, "", changes)
    return changes.items


class _Changes:
    """Where the rules report to; a trial comparison gets its own and keeps it or drops it."""

    def __init__(self) -> None:
        self.items: list[Change] = []

    def add(self, severity: Literal["breaking", "notice"], path: str, rule: str, message: str) -> None:
        self.items.append(Change(severity, path, rule, message))

    def child(self) -> _Changes:
        return _Changes()

    def weight(self) -> tuple[int, int]:
        return sum(c.severity == BREAKING for c in self.items), len(self.items)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _resolve(defs: Mapping[str, Any], schema: Schema) -> Schema:
    """``schema`` with its ``$ref`` (and a single-element ``allOf``) replaced by the target."""
    seen: set[str] = set()
    while True:
        if "$ref" in schema and schema["$ref"] not in seen:
            ref = str(schema["$ref"])
            seen.add(ref)
            target = defs.get(ref.rsplit("/", 1)[-1])
            if target is None:
                return schema
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        elif isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            schema = {**schema["allOf"][0], **{k: v for k, v in schema.items() if k != "allOf"}}
        else:
            return schema


_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")


def _alternatives(defs: Mapping[str, Any], schema: Schema) -> list[Schema]:
    """The schemas a value may match: ``anyOf``/``oneOf`` flattened, a list of types split."""
    schema = _resolve(defs, schema)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            shared = {k: v for k, v in schema.items() if k not in (key, "discriminator", *_ANNOTATIONS)}
            return [alt for option in schema[key] for alt in _alternatives(defs, {**shared, **option})]
    types = schema.get("type")
    if isinstance(types, list):
        return [{**schema, "type": t} for t in types]
    return [schema]


_JSON_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (type(None), "null"),
    ((list, tuple), "array"),
    (dict, "object"),
)


def _type_of_value(value: object) -> str:
    return next(name for kinds, name in _JSON_TYPES if isinstance(value, kinds))


def _values(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    return None


def _kind(schema: Schema) -> str | None:
    """The JSON type an alternative accepts, or None for any."""
    if isinstance(schema.get("type"), str):
        return str(schema["type"])
    values = _values(schema)
    if values:
        kinds = {_type_of_value(v) for v in values}
        if kinds <= {"integer", "number"} and len(kinds) == 2:
            return "number"
        if len(kinds) == 1:
            return kinds.pop()
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _accepts(new_kind: str | None, old_kind: str | None) -> bool:
    return new_kind is None or new_kind == old_kind or (new_kind == "number" and old_kind == "integer")


def _describe(schema: Schema) -> str:
    values = _values(schema)
    if values is not None:
        return " | ".join(json.dumps(v) for v in values)
    return _kind(schema) or "any value"


def _describe_all(alternatives: Sequence[Schema]) -> str:
    return " | ".join(_describe(a) for a in alternatives) or "nothing"


# (keyword, the bound it sets): a lower bound tightens when raised, an upper one when lowered.
_LOWER_BOUNDS = ("minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maxLength", "maxItems", "maxProperties")
_EXACT = ("pattern", "format", "contentEncoding", "contentMediaType")


class _SchemaPair:
    """The locked schema and the current one, each with its own ``$defs``."""

    def __init__(self, old_root: Schema, new_root: Schema) -> None:
        self.old_defs: Mapping[str, Any] = old_root.get("$defs", {})
        self.new_defs: Mapping[str, Any] = new_root.get("$defs", {})
        self._visiting: set[tuple[str, str]] = set()

    def compare(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        refs = (str(old.get("$ref", "")), str(new.get("$ref", "")))
        if not all(refs):
            self._compare(old, new, path, found)
        elif refs not in self._visiting:  # a recursive model stops where it refers to itself
            self._visiting.add(refs)
            try:
                self._compare(old, new, path, found)
            finally:
                self._visiting.discard(refs)

    def _compare(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        olds, news = _alternatives(self.old_defs, old), _alternatives(self.new_defs, new)
        for old_alt in olds:
            candidates = [n for n in news if _accepts(_kind(n), _kind(old_alt))]
            if not candidates:
                message = f"{_describe(old_alt)} is no longer accepted (now: {_describe_all(news)})"
                found.add(BREAKING, path, TYPE_NARROWED, message)
                continue
            trials = []
            for candidate in candidates:  # the alternative that takes the old one best
                trial = found.child()
                self._compare_alternative(old_alt, candidate, path, trial)
                trials.append(trial)
            found.items.extend(min(trials, key=_Changes.weight).items)
        for new_alt in news:
            if not any(_accepts(_kind(o), _kind(new_alt)) for o in olds):
                found.add(NOTICE, path, TYPE_WIDENED, f"{_describe(new_alt)} is accepted now")

    def _compare_alternative(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        new_kind = _kind(new)
        self._compare_values(old, new, path, found)
        self._compare_bounds(old, new, path, found)
        for key in _EXACT:
            if key in new and new[key] != old.get(key):
                what = "added" if key not in old else f"changed from {old[key]!r}"
                found.add(BREAKING, path, TYPE_NARROWED, f"{key} {new[key]!r} {what}")
            elif key in old and key not in new:
                found.add(NOTICE, path, TYPE_WIDENED, f"{key} {old[key]!r} dropped")
        if new.get("uniqueItems") and not old.get("uniqueItems"):
            found.add(BREAKING, path, TYPE_NARROWED, "items must be unique now")
        # A new alternative of any type accepts every value of the old one: nothing to look into.
        if new_kind == "object":
            self._compare_object(old, new, path, found)
        elif new_kind == "array":
            self._compare_array(old, new, path, found)

    def _compare_values(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        old_values, new_values = _values(old), _values(new)
        if new_values is None:
            if old_values is not None:
                found.add(
                    NOTICE, path, TYPE_WIDENED, f"any {_kind(new) or 'value'} is accepted, not only {_describe(old)}"
                )
            return
        if old_values is None:
            found.add(
                BREAKING, path, TYPE_NARROWED, f"only {_describe(new)} is accepted now (was: any {_describe(old)})"
            )
            return
        lost = [v for v in old_values if v not in new_values]
        gained = [v for v in new_values if v not in old_values]
        if lost:
            shown = ", ".join(json.dumps(v) for v in lost)
            found.add(BREAKING, path, TYPE_NARROWED, f"value {shown} no longer accepted (now: {_describe(new)})")
        if gained:
            found.add(NOTICE, path, TYPE_WIDENED, f"value {', '.join(json.dumps(v) for v in gained)} accepted now")

    def _compare_bounds(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        for side in ("minimum", "maximum"):
            old_bound, new_bound = _numeric_bound(old, side), _numeric_bound(new, side)
            if new_bound == old_bound:
                continue
            old_shown, new_shown = _show_bound(side, old_bound), _show_bound(side, new_bound)
            if new_bound is None:
                found.add(NOTICE, path, TYPE_WIDENED, f"{side} {old_shown} dropped")
            elif old_bound is None or _tighter(side, new_bound, old_bound):
                was = "" if old_bound is None else f" (was {old_shown})"
                verb = "raised" if side == "minimum" else "lowered"
                found.add(BREAKING, path, TYPE_NARROWED, f"{side} {verb} to {new_shown}{was}")
            else:
                found.add(NOTICE, path, TYPE_WIDENED, f"{side} {old_shown} loosened to {new_shown}")
        for key in (*_LOWER_BOUNDS, *_UPPER_BOUNDS):
            if old.get(key) == new.get(key):
                continue
            lower = key in _LOWER_BOUNDS
            if key not in new:
                found.add(NOTICE, path, TYPE_WIDENED, f"{key} {old[key]} dropped")
            elif key not in old or (new[key] > old[key] if lower else new[key] < old[key]):
                if lower and key not in old and new[key] == 0:
                    continue
                was = f" (was {old[key]})" if key in old else ""
                found.add(BREAKING, path, TYPE_NARROWED, f"{key} {'raised' if lower else 'lowered'} to {new[key]}{was}")
            else:
                found.add(NOTICE, path, TYPE_WIDENED, f"{key} {old[key]} loosened to {new[key]}")
        old_step, new_step = old.get("multipleOf"), new.get("multipleOf")
        if new_step is not None and new_step != old_step:
            if old_step is None or (old_step / new_step) % 1:  # a multiple of old_step may not be one of new_step
                was = "added" if old_step is None else f"(was {old_step})"
                found.add(BREAKING, path, TYPE_NARROWED, f"multipleOf {new_step} {was}")
            else:
                found.add(NOTICE, path, TYPE_WIDENED, f"multipleOf {old_step} loosened to {new_step}")
        elif old_step is not None and new_step is None:
            found.add(NOTICE, path, TYPE_WIDENED, f"multipleOf {old_step} dropped")

    def _compare_object(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        old_props: Mapping[str, Any] = old.get("properties", {})
        new_props: Mapping[str, Any] = new.get("properties", {})
        old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
        for name, old_prop in old_props.items():
            field = _join(path, name)
            if name not in new_props:
                twins = [n for n, p in new_props.items() if n not in old_props and _shape(p) == _shape(old_prop)]
                hint = f" (renamed to {twins[0]!r}?)" if twins else ""
                found.add(BREAKING, field, FIELD_REMOVED, f"the locked version has it, the model does not{hint}")
                continue
            if name in new_required and name not in old_required:
                found.add(BREAKING, field, REQUIRED_ADDED, "was optional, is required now")
            elif name in old_required and name not in new_required:
                found.add(NOTICE, field, FIELD_OPTIONAL, "was required, is optional now")
            self.compare(old_prop, new_props[name], field, found)
        for name in new_props:
            if name in old_props:
                continue
            if name in new_required:
                found.add(BREAKING, _join(path, name), REQUIRED_ADDED, "a new field without a default")
            else:
                found.add(NOTICE, _join(path, name), FIELD_ADDED, "a new field with a default")
        old_extra, new_extra = old.get("additionalProperties", True), new.get("additionalProperties", True)
        if new_extra is False and old_extra is not False:
            found.add(BREAKING, path, TYPE_NARROWED, "additional properties are no longer accepted")
        elif old_extra is False and new_extra is not False:
            found.add(NOTICE, path, TYPE_WIDENED, "additional properties are accepted now")
        elif old_extra is not False:
            self.compare(_as_schema(old_extra), _as_schema(new_extra), _join(path, "*"), found)
        if "propertyNames" in old or "propertyNames" in new:
            old_keys, new_keys = _as_schema(old.get("propertyNames")), _as_schema(new.get("propertyNames"))
            self.compare(old_keys, new_keys, _join(path, "<key>"), found)

    def _compare_array(self, old: Schema, new: Schema, path: str, found: _Changes) -> None:
        old_prefix: Sequence[Any] = old.get("prefixItems", ())
        new_prefix: Sequence[Any] = new.get("prefixItems", ())
        for index, (old_item, new_item) in enumerate(zip(old_prefix, new_prefix, strict=False)):
            self.compare(old_item, new_item, f"{path}[{index}]", found)
        old_items, new_items = old.get("items", True), new.get("items", True)
        if new_items is False and old_items is not False:
            found.add(BREAKING, path, TYPE_NARROWED, "no items are accepted beyond the fixed ones")
        elif old_items is False and new_items is not False:
            found.add(NOTICE, path, TYPE_WIDENED, "items are accepted beyond the fixed ones")
        elif old_items is not False:
            self.compare(_as_schema(old_items), _as_schema(new_items), f"{path}[]", found)


def _shape(schema: Schema) -> dict[str, Any]:
    """``schema`` without its annotations: a renamed field keeps its shape, not its title."""
    return {k: v for k, v in schema.items() if k not in ("title", "description", "examples")}


def _as_schema(value: object) -> Schema:
    """A schema for ``additionalProperties``/``items``/``propertyNames``: True (or absent) is any value."""
    return value if isinstance(value, Mapping) else {}


def _numeric_bound(schema: Schema, side: str) -> tuple[float, bool] | None:
    """The effective ``(value, exclusive)`` minimum or maximum of ``schema``, or None."""
    inclusive = schema.get(side)
    exclusive = schema.get("exclusiveMinimum" if side == "minimum" else "exclusiveMaximum")
    if isinstance(exclusive, bool):  # draft 4: a flag on the inclusive bound
        exclusive, inclusive = (inclusive, None) if exclusive else (None, inclusive)
    bounds = [(float(v), e) for v, e in ((inclusive, False), (exclusive, True)) if isinstance(v, int | float)]
    if not bounds:
        return None
    return max(bounds, key=lambda b: (b[0], b[1])) if side == "minimum" else min(bounds, key=lambda b: (b[0], -b[1]))


def _tighter(side: str, new: tuple[float, bool], old: tuple[float, bool]) -> bool:
    if new[0] != old[0]:
        return new[0] > old[0] if side == "minimum" else new[0] < old[0]
    return new[1] and not old[1]


def _show_bound(side: str, bound: tuple[float, bool] | None) -> str:
    if bound is None:
        return "none"
    value, exclusive = bound
    number = int(value) if value.is_integer() else value
    return f"{'>' if side == 'minimum' else '<'}{'' if exclusive else '='} {number}"
