"""Schema evolution: snapshot the contracts, and find the changes that need a new version.

``eventbus contracts lock`` writes :func:`snapshot` to ``contracts.lock.json``; ``eventbus
contracts check`` :func:`compare`-s that lock with the code. A change to a locked version is
*breaking* when data the locked schema accepted may no longer be accepted, or a field
handlers relied on is gone:

- ``field removed or renamed``: a property of the locked version is gone;
- ``type narrowed``: a type no longer accepted (``number`` -> ``integer``, ``str | None`` ->
  ``str``), an enum or Literal losing a value, a const added, a bound tightened (minimum,
  maximum and their exclusive forms, minLength/maxLength, minItems/maxItems,
  minProperties/maxProperties, multipleOf), a pattern or format added or changed, unique
  items required, additional properties forbidden;
- ``new required field``: a new field without a default, or an optional field made required;
- ``version removed``: a locked version is no longer declared.

The opposite changes (a new optional field, an enum gaining a value, a bound loosened) are
*notices*, and so are a version or event type not locked yet and a version N with no
upcaster from N-1. A field's rules are :mod:`project.schema_diff`'s, on pydantic's JSON
Schemas: ``$ref``/``$defs`` are resolved, and nested objects, array items, ``anyOf``/``oneOf``
alternatives and ``additionalProperties`` maps are compared field by field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from project.contracts import Contracts
from project.schema_diff import (
    BREAKING,
    FIELD_ADDED,
    FIELD_OPTIONAL,
    FIELD_REMOVED,
    NOTICE,
    REQUIRED_ADDED,
    TYPE_NARROWED,
    TYPE_WIDENED,
    diff,
)

__all__ = [
    "BREAKING",
    "FIELD_ADDED",
    "FIELD_OPTIONAL",
    "FIELD_REMOVED",
    "LOCK_OUTDATED",
    "MODEL_RENAMED",
    "NOTICE",
    "NOT_LOCKED",
    "NO_UPCASTER",
    "REQUIRED_ADDED",
    "TYPE_NARROWED",
    "TYPE_WIDENED",
    "VERSION_REMOVED",
    "Finding",
    "compare",
    "render",
    "snapshot",
]

# The rules of a whole version; a field's rules are project.schema_diff's.
VERSION_REMOVED = "version removed"
NOT_LOCKED = "not in the lock"
NO_UPCASTER = "no upcaster"
MODEL_RENAMED = "model renamed"
LOCK_OUTDATED = "lock out of date"

_FORMAT = 1
_ABOUT = (
    "Event contracts as locked by `eventbus contracts lock`; `eventbus contracts check` fails on a "
    "breaking change to a locked version. Commit this file."
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One difference between the lock and the code."""

    severity: Literal["breaking", "notice"]
    event_type: str
    version: int
    path: str  # the field, dotted ("signs.*" a map's values, "tags[]" a list's items); "" the whole version
    rule: str
    message: str

    @property
    def breaking(self) -> bool:
        """True when this change needs a new version."""
        return self.severity == BREAKING

    def __str__(self) -> str:
        where = f"field '{self.path}': " if self.path else ""
        return f"{self.event_type} v{self.version}: {where}{self.rule}: {self.message}"


def snapshot(registry: Contracts, *, within: Sequence[str] | None = None) -> dict[str, Any]:
    """The lock of ``registry``: per event type, per version, the model's name and JSON Schema.

    ``within`` (the ``EVENT_CONTRACT_MODULES`` packages) keeps the contracts declared under
    them and the dispatcher's own, as :meth:`Contracts.get` does. The result is plain JSON
    (write it with :func:`render`).
    """
    event_types: dict[str, Any] = {}
    for contract in registry:
        if within is not None and registry.get(contract.event_type, contract.version, within=within) is not contract:
            continue
        entry = event_types.setdefault(contract.event_type, {"versions": {}, "upcasters": []})
        entry["versions"][str(contract.version)] = {"model": contract.name, "schema": contract.json_schema()}
    for event_type, from_version in sorted(registry.upcasters()):
        if event_type in event_types:
            event_types[event_type]["upcasters"].append(from_version)
    lock = {"about": _ABOUT, "format": _FORMAT, "event_types": event_types}
    result: dict[str, Any] = json.loads(json.dumps(lock))  # tuples -> lists: equal to the file read back
    return result


def render(lock: Mapping[str, Any]) -> str:
    """The lock as file text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(lock, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def compare(locked: Mapping[str, Any], current: Mapping[str, Any]) -> list[Finding]:
    """Every difference between the ``locked`` snapshot and the ``current`` one, breaking first."""
    findings: list[Finding] = []
    old_types: Mapping[str, Any] = locked.get("event_types", {})
    new_types: Mapping[str, Any] = current.get("event_types", {})
    for event_type in sorted(set(old_types) | set(new_types)):
        old_versions: Mapping[str, Any] = old_types.get(event_type, {}).get("versions", {})
        new_versions: Mapping[str, Any] = new_types.get(event_type, {}).get("versions", {})
        for version in sorted({int(v) for v in (*old_versions, *new_versions)}):
            findings.extend(_compare_version(event_type, version, old_versions, new_versions, old_types))
        upcasters = set(new_types.get(event_type, {}).get("upcasters", []))
        locked_upcasters = set(old_types.get(event_type, {}).get("upcasters", []))
        if event_type in old_types and event_type in new_types and upcasters != locked_upcasters:
            # An upcaster to a version not locked yet comes with that version's own notice.
            changed = {v for v in upcasters ^ locked_upcasters if str(v + 1) in old_versions}
            for from_version in sorted(changed):
                what = "is new" if from_version in upcasters else "is gone"
                message = f"the upcaster from version {from_version} {what}: run eventbus contracts lock"
                findings.append(Finding(NOTICE, event_type, from_version + 1, "", LOCK_OUTDATED, message))
        for version in sorted(int(v) for v in new_versions):
            previous = version - 1
            if version > 1 and str(previous) in new_versions and previous not in upcasters:
                message = (
                    f"none from version {previous}: a handler written for version {version} cannot receive "
                    f"events published as {previous} (@event_bus.upcaster({event_type!r}, from_version={previous}))"
                )
                findings.append(Finding(NOTICE, event_type, version, "", NO_UPCASTER, message))
    return sorted(findings, key=lambda f: (not f.breaking, f.event_type, f.version, f.path))


def _compare_version(
    event_type: str,
    version: int,
    old_versions: Mapping[str, Any],
    new_versions: Mapping[str, Any],
    old_types: Mapping[str, Any],
) -> list[Finding]:
    old, new = old_versions.get(str(version)), new_versions.get(str(version))

    def finding(severity: Literal["breaking", "notice"], rule: str, message: str, path: str = "") -> Finding:
        return Finding(severity, event_type, version, path, rule, message)

    if new is None:
        message = f"version {version} of {event_type} removed: publishers or stored events may still use it"
        return [finding(BREAKING, VERSION_REMOVED, message)]
    if old is None:
        what = "this version" if event_type in old_types else "this event type"
        return [finding(NOTICE, NOT_LOCKED, f"{what} is new: run eventbus contracts lock")]
    found = [finding(c.severity, c.rule, c.message, c.path) for c in diff(old.get("schema", {}), new.get("schema", {}))]
    if old.get("model") != new.get("model"):
        found.append(finding(NOTICE, MODEL_RENAMED, f"{old.get('model')} is now {new.get('model')}"))
    if not found and old != new:
        found.append(
            finding(NOTICE, LOCK_OUTDATED, "the schema changed but accepts the same data: run eventbus contracts lock")
        )
    return found
