"""Schema evolution: each breaking-change rule fails the check, widening does not, and the CLI says so.

Every test declares its models in a fresh :class:`Contracts` registry, never the process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from project.contracts import Contracts
from project.evolution import (
    FIELD_ADDED,
    FIELD_OPTIONAL,
    FIELD_REMOVED,
    LOCK_OUTDATED,
    NO_UPCASTER,
    NOT_LOCKED,
    REQUIRED_ADDED,
    TYPE_NARROWED,
    TYPE_WIDENED,
    VERSION_REMOVED,
    Finding,
    compare,
    render,
    snapshot,
)
from project.settings import Settings

TYPE = "shop.order.placed"


def _lock(*declared: tuple[int, type[BaseModel]], upcasts: tuple[int, ...] = ()) -> dict[str, Any]:
    registry = Contracts()
    for version, model in declared:
        registry.declare(TYPE, model, version=version)
    for from_version in upcasts:
        registry.add_upcaster(TYPE, from_version, dict)
    return snapshot(registry)


def _changes(old: type[BaseModel], new: type[BaseModel]) -> list[Finding]:
    return compare(_lock((1, old)), _lock((1, new)))


def _breaking(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.path, f.rule) for f in findings if f.breaking]


def _notices(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.path, f.rule) for f in findings if not f.breaking]


# -- breaking changes, one rule at a time -------------------------------------------------


class Address(BaseModel):
    city: str
    street: str


class AddressWithoutStreet(BaseModel):
    city: str


def _case(**fields: Any) -> type[BaseModel]:
    """A model named Order with ``fields`` (name=(type, default or ...))."""
    from pydantic import create_model

    return create_model("Order", **fields)  # type: ignore[call-overload, no-any-return]


BREAKING_CASES = [
    pytest.param(
        {"total": (float, ...), "note": (str, ...)},
        {"total": (float, ...)},
        ("note", FIELD_REMOVED),
        id="field-removed",
    ),
    pytest.param({"total": (float, ...)}, {"total": (int, ...)}, ("total", TYPE_NARROWED), id="number-to-integer"),
    pytest.param({"note": (str | None, None)}, {"note": (str, "")}, ("note", TYPE_NARROWED), id="optional-str-to-str"),
    pytest.param({"n": (int | str, ...)}, {"n": (int, ...)}, ("n", TYPE_NARROWED), id="union-loses-a-type"),
    pytest.param(
        {"size": (Literal["s", "m", "l"], ...)},
        {"size": (Literal["s", "m"], ...)},
        ("size", TYPE_NARROWED),
        id="enum-loses-a-value",
    ),
    pytest.param({"kind": (str, ...)}, {"kind": (Literal["retail"], ...)}, ("kind", TYPE_NARROWED), id="const-added"),
    pytest.param({"n": (int, Field(ge=0))}, {"n": (int, Field(ge=1))}, ("n", TYPE_NARROWED), id="minimum-raised"),
    pytest.param(
        {"n": (int, Field(ge=0))}, {"n": (int, Field(gt=0))}, ("n", TYPE_NARROWED), id="minimum-made-exclusive"
    ),
    pytest.param({"n": (int, Field(le=9))}, {"n": (int, Field(le=8))}, ("n", TYPE_NARROWED), id="maximum-lowered"),
    pytest.param(
        {"n": (int, Field(lt=9))}, {"n": (int, Field(lt=8))}, ("n", TYPE_NARROWED), id="exclusive-max-lowered"
    ),
    pytest.param({"n": (int, ...)}, {"n": (int, Field(le=100))}, ("n", TYPE_NARROWED), id="maximum-added"),
    pytest.param({"n": (int, ...)}, {"n": (int, Field(multiple_of=5))}, ("n", TYPE_NARROWED), id="multiple-of-added"),
    pytest.param(
        {"s": (str, Field(min_length=1))},
        {"s": (str, Field(min_length=3))},
        ("s", TYPE_NARROWED),
        id="min-length-raised",
    ),
    pytest.param(
        {"s": (str, Field(max_length=50))},
        {"s": (str, Field(max_length=10))},
        ("s", TYPE_NARROWED),
        id="max-length-lowered",
    ),
    pytest.param({"s": (str, ...)}, {"s": (str, Field(pattern="^[a-z]+$"))}, ("s", TYPE_NARROWED), id="pattern-added"),
    pytest.param(
        {"s": (str, Field(pattern="^[a-z]+$"))},
        {"s": (str, Field(pattern="^[a-z]{2}$"))},
        ("s", TYPE_NARROWED),
        id="pattern-changed",
    ),
    pytest.param({"at": (str, ...)}, {"at": (datetime, ...)}, ("at", TYPE_NARROWED), id="format-added"),
    pytest.param(
        {"tags": (list[str], ...)}, {"tags": (list[str], Field(min_length=1))}, ("tags", TYPE_NARROWED), id="min-items"
    ),
    pytest.param(
        {"tags": (list[str], Field(max_length=9))},
        {"tags": (list[str], Field(max_length=3))},
        ("tags", TYPE_NARROWED),
        id="max-items",
    ),
    pytest.param({"tags": (list[str], ...)}, {"tags": (set[str], ...)}, ("tags", TYPE_NARROWED), id="unique-items"),
    pytest.param({"scores": (list[float], ...)}, {"scores": (list[int], ...)}, ("scores[]", TYPE_NARROWED), id="items"),
    pytest.param(
        {"by_sku": (dict[str, float], ...)},
        {"by_sku": (dict[str, int], ...)},
        ("by_sku.*", TYPE_NARROWED),
        id="map-values",
    ),
    pytest.param(
        {"by_sku": (dict[str, int], ...)},
        {"by_sku": (dict[Literal["a", "b"], int], ...)},
        ("by_sku.<key>", TYPE_NARROWED),
        id="map-keys",
    ),
    pytest.param(
        {"pair": (tuple[float, str], ...)},
        {"pair": (tuple[int, str], ...)},
        ("pair[0]", TYPE_NARROWED),
        id="tuple-item",
    ),
    pytest.param(
        {"ship_to": (Address, ...)},
        {"ship_to": (AddressWithoutStreet, ...)},
        ("ship_to.street", FIELD_REMOVED),
        id="nested-field-removed",
    ),
    pytest.param(
        {"ship_to": (Address | None, None)},
        {"ship_to": (AddressWithoutStreet | None, None)},
        ("ship_to.street", FIELD_REMOVED),
        id="nested-in-union",
    ),
    pytest.param(
        {"stops": (list[Address], ...)},
        {"stops": (list[AddressWithoutStreet], ...)},
        ("stops[].street", FIELD_REMOVED),
        id="nested-in-list",
    ),
    pytest.param(
        {"total": (float, ...)},
        {"total": (float, ...), "currency": (str, ...)},
        ("currency", REQUIRED_ADDED),
        id="new-field-without-default",
    ),
    pytest.param(
        {"total": (float, 0.0)}, {"total": (float, ...)}, ("total", REQUIRED_ADDED), id="optional-made-required"
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), BREAKING_CASES)
def test_a_breaking_change_is_found_with_its_field_and_rule(
    old: dict[str, Any], new: dict[str, Any], expected: tuple[str, str]
) -> None:
    findings = _changes(_case(**old), _case(**new))
    assert expected in _breaking(findings), [str(f) for f in findings]


def test_forbidding_extra_fields_is_breaking() -> None:
    class Open(BaseModel):
        total: float

    class Closed(BaseModel):
        model_config = ConfigDict(extra="forbid")
        total: float

    findings = _changes(Open, Closed)
    assert _breaking(findings) == [("", TYPE_NARROWED)]
    assert "additional properties are no longer accepted" in str(findings[0])
    assert _breaking(_changes(Closed, Open)) == []


def test_a_rename_is_a_removal_and_the_message_guesses_the_new_name() -> None:
    findings = _changes(_case(sun_sign=(str, ...)), _case(sign=(str, ...)))
    assert _breaking(findings) == [("sign", REQUIRED_ADDED), ("sun_sign", FIELD_REMOVED)]
    removed = next(f for f in findings if f.rule == FIELD_REMOVED)
    assert "renamed to 'sign'?" in removed.message


def test_a_finding_reads_type_version_field_rule_and_detail() -> None:
    (finding,) = _changes(_case(total=(float, ...)), _case(total=(int, ...)))
    assert str(finding) == (
        "shop.order.placed v1: field 'total': type narrowed: number is no longer accepted (now: integer)"
    )
    (finding,) = [f for f in _changes(_case(n=(str | None, None)), _case(n=(str, ""))) if f.breaking]
    assert str(finding) == "shop.order.placed v1: field 'n': type narrowed: null is no longer accepted (now: string)"


def test_a_nested_model_used_twice_is_compared_at_each_place() -> None:
    findings = _changes(
        _case(home=(Address, ...), work=(Address, ...)),
        _case(home=(AddressWithoutStreet, ...), work=(AddressWithoutStreet, ...)),
    )
    assert _breaking(findings) == [("home.street", FIELD_REMOVED), ("work.street", FIELD_REMOVED)]


class Node(BaseModel):
    name: str
    children: list[Node] = []


class NodeV2(BaseModel):
    name: str = Field(max_length=10)
    children: list[NodeV2] = []


def test_a_recursive_model_is_compared_without_looping() -> None:
    assert _changes(Node, Node) == []
    assert _breaking(_changes(Node, NodeV2)) == [("name", TYPE_NARROWED)]


# -- widening changes are notices --------------------------------------------------------

WIDENING_CASES = [
    pytest.param(
        {"total": (float, ...)},
        {"total": (float, ...), "note": (str, "")},
        ("note", FIELD_ADDED),
        id="new-optional-field",
    ),
    pytest.param(
        {"size": (Literal["s", "m"], ...)},
        {"size": (Literal["s", "m", "l"], ...)},
        ("size", TYPE_WIDENED),
        id="enum-gains",
    ),
    pytest.param({"n": (int, Field(ge=1))}, {"n": (int, Field(ge=0))}, ("n", TYPE_WIDENED), id="minimum-lowered"),
    pytest.param({"n": (int, Field(le=8))}, {"n": (int, ...)}, ("n", TYPE_WIDENED), id="maximum-dropped"),
    pytest.param(
        {"s": (str, Field(max_length=10))},
        {"s": (str, Field(max_length=50))},
        ("s", TYPE_WIDENED),
        id="max-length-raised",
    ),
    pytest.param({"n": (int, ...)}, {"n": (float, ...)}, ("n", TYPE_WIDENED), id="integer-to-number"),
    pytest.param({"s": (str, ...)}, {"s": (str | None, ...)}, ("s", TYPE_WIDENED), id="null-accepted"),
    pytest.param({"kind": (Literal["retail"], ...)}, {"kind": (str, ...)}, ("kind", TYPE_WIDENED), id="const-dropped"),
    pytest.param(
        {"total": (float, ...)}, {"total": (float, 0.0)}, ("total", FIELD_OPTIONAL), id="required-made-optional"
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), WIDENING_CASES)
def test_a_widening_change_is_a_notice_not_a_failure(
    old: dict[str, Any], new: dict[str, Any], expected: tuple[str, str]
) -> None:
    findings = _changes(_case(**old), _case(**new))
    assert _breaking(findings) == [], [str(f) for f in findings]
    assert expected in _notices(findings)


def test_an_unchanged_model_has_no_finding_and_a_description_change_only_dates_the_lock() -> None:
    assert _changes(_case(total=(float, ...)), _case(total=(float, ...))) == []
    findings = _changes(_case(total=(float, ...)), _case(total=(float, Field(description="In cents."))))
    assert _breaking(findings) == []
    assert _notices(findings) == [("", LOCK_OUTDATED)]


# -- versions ------------------------------------------------------------------------------


class V1(BaseModel):
    sun_sign: str


class V2(BaseModel):
    signs: dict[str, str]


def test_removing_a_locked_version_is_breaking() -> None:
    findings = compare(_lock((1, V1), (2, V2), upcasts=(1,)), _lock((2, V2)))
    assert [(f.version, f.rule) for f in findings if f.breaking] == [(1, VERSION_REMOVED)]
    assert findings[0].message == (
        "version 1 of shop.order.placed removed: publishers or stored events may still use it"
    )
    removed_type = compare(_lock((1, V1)), snapshot(Contracts()))
    assert [(f.version, f.rule) for f in removed_type] == [(1, VERSION_REMOVED)]


def test_a_breaking_change_made_as_a_new_version_passes_with_notices() -> None:
    findings = compare(_lock((1, V1)), _lock((1, V1), (2, V2), upcasts=(1,)))
    assert _breaking(findings) == []
    assert [(f.version, f.rule) for f in findings] == [(2, NOT_LOCKED)]
    assert "run eventbus contracts lock" in str(findings[0])
    new_type = compare(snapshot(Contracts()), _lock((1, V1)))
    assert [(f.version, f.rule, f.message) for f in new_type] == [
        (1, NOT_LOCKED, "this event type is new: run eventbus contracts lock")
    ]


def test_a_version_without_an_upcaster_from_the_previous_one_is_a_notice() -> None:
    without = _lock((1, V1), (2, V2))
    findings = compare(without, without)
    assert [(f.version, f.rule, f.breaking) for f in findings] == [(2, NO_UPCASTER, False)]
    assert "from_version=1" in findings[0].message
    with_upcaster = _lock((1, V1), (2, V2), upcasts=(1,))
    assert compare(with_upcaster, with_upcaster) == []
    assert [f.rule for f in compare(without, with_upcaster)] == [LOCK_OUTDATED]  # the lock lacks it


# -- the lock file -------------------------------------------------------------------------


def test_the_lock_is_deterministic_json_with_sorted_keys_and_a_final_newline() -> None:
    lock = _lock((2, V2), (1, V1), upcasts=(1,))
    text = render(lock)
    assert text.endswith("}\n")
    assert json.loads(text) == lock
    assert text == render(_lock((1, V1), (2, V2), upcasts=(1,)))
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    entry = lock["event_types"][TYPE]
    assert entry["upcasters"] == [1]
    assert entry["versions"]["1"]["model"] == f"{__name__}.V1"
    assert entry["versions"]["1"]["schema"] == V1.model_json_schema()


def test_the_lock_keeps_only_the_configured_contract_packages() -> None:
    registry = Contracts()
    registry.declare(TYPE, V1)
    assert TYPE in snapshot(registry, within=[__name__])["event_types"]
    assert snapshot(registry, within=["contracts"])["event_types"] == {}


# -- the commands --------------------------------------------------------------------------

PACKAGE_V1 = """
    from pydantic import BaseModel, Field
    from project.contracts import event

    @event("shop.order.placed", version=1)
    class OrderPlaced(BaseModel):
        total: float = Field(ge=0)
        note: str | None = None
"""

# total narrowed to int and note removed, in place: a breaking change without a new version.
PACKAGE_BROKEN = """
    from pydantic import BaseModel, Field
    from project.contracts import event

    @event("shop.order.placed", version=1)
    class OrderPlaced(BaseModel):
        total: int = Field(ge=0)
"""

# The same change made right: version 1 kept, version 2 added with an upcaster.
PACKAGE_V2 = (
    PACKAGE_V1
    + """
    @event("shop.order.placed", version=2)
    class OrderPlacedV2(BaseModel):
        total_cents: int = Field(ge=0)

    from project.contracts import upcaster

    @upcaster("shop.order.placed", from_version=1)
    def _v1_to_v2(data):
        return {"total_cents": round(data["total"] * 100)}
"""
)


def _eventbus(tmp_path: Path, source: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``eventbus`` with ``source`` as the only contracts package (``shopcontracts``)."""
    package = tmp_path / "shopcontracts"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update({"EVENT_CONTRACT_MODULES": "shopcontracts", "PYTHONPATH": str(tmp_path)})
    return subprocess.run(
        [sys.executable, "-m", "project.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lock_then_check_passes_and_a_breaking_change_fails_the_check(tmp_path: Path) -> None:
    lock_file = tmp_path / "locks" / "shop.lock.json"
    lock_file.parent.mkdir()
    done = _eventbus(tmp_path, PACKAGE_V1, "contracts", "lock", "--file", str(lock_file))
    assert done.returncode == 0, done.stderr
    lock = json.loads(lock_file.read_text())
    assert set(lock["event_types"]) == {"shop.order.placed", "module.error"}  # the dispatcher's own too
    assert lock_file.read_text().endswith("}\n")

    done = _eventbus(tmp_path, PACKAGE_V1, "contracts", "check", "--file", str(lock_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""

    done = _eventbus(tmp_path, PACKAGE_BROKEN, "contracts", "check", "--file", str(lock_file))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "shop.order.placed v1: field 'total': type narrowed: number is no longer accepted (now: integer)" in lines
    assert any(line.startswith("shop.order.placed v1: field 'note': field removed or renamed:") for line in lines)
    assert "breaking change(s) without a new version" in done.stderr

    # lock does not paper over it unless forced
    done = _eventbus(tmp_path, PACKAGE_BROKEN, "contracts", "lock", "--file", str(lock_file))
    assert done.returncode == 1
    assert "field 'total'" in done.stdout
    assert json.loads(lock_file.read_text()) == lock


def test_a_new_version_passes_the_check_and_strict_asks_for_a_new_lock(tmp_path: Path) -> None:
    assert _eventbus(tmp_path, PACKAGE_V1, "contracts", "lock").returncode == 0  # default file, in the cwd
    assert (tmp_path / "contracts.lock.json").exists()

    done = _eventbus(tmp_path, PACKAGE_V2, "contracts", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "notice: shop.order.placed v2: not in the lock: this version is new: run eventbus contracts lock" in (
        done.stdout.splitlines()
    )
    strict = _eventbus(tmp_path, PACKAGE_V2, "contracts", "check", "--strict")
    assert strict.returncode == 1
    assert "out of date" in strict.stderr

    assert _eventbus(tmp_path, PACKAGE_V2, "contracts", "lock").returncode == 0
    assert _eventbus(tmp_path, PACKAGE_V2, "contracts", "check", "--strict").returncode == 0


def test_check_without_a_lock_file_fails_and_says_how_to_make_one(tmp_path: Path) -> None:
    done = _eventbus(tmp_path, PACKAGE_V1, "contracts", "check")
    assert done.returncode == 1
    assert "contracts.lock.json not found: run eventbus contracts lock" in done.stderr
