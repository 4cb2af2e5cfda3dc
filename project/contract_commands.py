"""The ``eventbus`` commands about contracts: ``contracts lock``, ``contracts check``, ``catalog``.

- ``eventbus contracts lock [--file contracts.lock.json]`` snapshots every contract (the
  ``EVENT_CONTRACT_MODULES`` packages and the dispatcher's ``module.error``); it refuses to
  overwrite a lock with a breaking change unless ``--force``.
- ``eventbus contracts check [--file ...] [--strict]`` compares the code with the lock
  (:mod:`project.evolution`): exit status 1 on a breaking change made without a new
  version, each printed as ``<event_type> v<N>: field '<path>': <rule>: <detail>``;
  notices are printed too, and fail the check only with ``--strict``.
- ``eventbus catalog [--format asyncapi|markdown] [--output FILE]`` writes the catalog
  (:mod:`project.catalog`) of the configured application.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from project.cli import Subcommands
    from project.settings import Settings

__all__ = ["DEFAULT_LOCK_FILE", "add_commands"]

DEFAULT_LOCK_FILE = "contracts.lock.json"


def _load_contracts(settings: Settings) -> None:
    import project.delivery  # noqa: F401  (declares the dispatcher's own contract, module.error)
    from project.contracts import load_contract_modules

    # The default package name may not exist in an application; one named on purpose must.
    explicit = "event_contract_modules" in settings.model_fields_set
    load_contract_modules(settings.event_contract_modules, required=explicit)


def _current() -> dict[str, Any]:
    from project.contracts import contracts
    from project.evolution import snapshot
    from project.settings import get_settings

    settings = get_settings()
    _load_contracts(settings)
    return snapshot(contracts, within=settings.event_contract_modules)


def _read_lock(path: Path, command: str) -> dict[str, Any] | None:
    try:
        locked = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"eventbus {command}: {path} not found: run eventbus contracts lock, and commit it", file=sys.stderr)
        return None
    except (OSError, ValueError) as exc:
        print(f"eventbus {command}: cannot read {path}: {exc}", file=sys.stderr)
        return None
    if not isinstance(locked, dict) or not isinstance(locked.get("event_types"), dict):
        print(f"eventbus {command}: {path} is not a contracts lock (no event_types)", file=sys.stderr)
        return None
    return locked


def _write(path: Path, text: str) -> None:
    # Written aside and renamed: an interrupted write never leaves half a file to commit.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def cmd_contracts_lock(args: argparse.Namespace) -> int:
    """Write the lock; refuse (exit 1) to lock in a breaking change unless --force."""
    from project.evolution import compare, render

    current = _current()
    path = Path(args.file)
    if path.exists() and not args.force:
        locked = _read_lock(path, "contracts lock")
        if locked is None:
            return 1
        breaking = [f for f in compare(locked, current) if f.breaking]
        if breaking:
            for finding in breaking:
                print(finding)
            print(
                f"eventbus contracts lock: {len(breaking)} breaking change(s) to locked versions; declare a new "
                "version instead (--force locks them anyway)",
                file=sys.stderr,
            )
            return 1
    _write(path, render(current))
    types = current["event_types"]
    versions = sum(len(t["versions"]) for t in types.values())
    print(f"wrote {path}: {len(types)} event types, {versions} contract versions", file=sys.stderr)
    return 0


def cmd_contracts_check(args: argparse.Namespace) -> int:
    """Compare the code with the lock: 1 on a breaking change (or any notice with --strict)."""
    from project.evolution import compare

    current = _current()
    path = Path(args.file)
    locked = _read_lock(path, "contracts check")
    if locked is None:
        return 1
    findings = compare(locked, current)
    breaking = [f for f in findings if f.breaking]
    notices = [f for f in findings if not f.breaking]
    for finding in breaking:
        print(finding)
    for finding in notices:
        print(f"notice: {finding}")
    if breaking:
        print(
            f"eventbus contracts check: {len(breaking)} breaking change(s) without a new version. Keep the "
            "locked version as it is and declare the changed model as a new version, with an upcaster "
            "from the previous one.",
            file=sys.stderr,
        )
        return 1
    if notices and args.strict:
        print(
            f"eventbus contracts check: {path} is out of date (--strict): run eventbus contracts lock", file=sys.stderr
        )
        return 1
    count = sum(len(t["versions"]) for t in current["event_types"].values())
    print(f"eventbus contracts check: {count} contract versions, no breaking change against {path}", file=sys.stderr)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    """Write the catalog of the configured application: AsyncAPI 3.0 YAML or Markdown."""
    from project.catalog import asyncapi_document, collect, markdown_page, render_yaml
    from project.events import event_bus

    _load_contracts(event_bus.settings)
    event_bus.load_modules()
    catalog = collect(event_bus)
    if args.format == "markdown":
        text = markdown_page(catalog)
    else:
        text = render_yaml(asyncapi_document(catalog, event_bus.settings))
    if args.output and args.output != "-":
        _write(Path(args.output), text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Add ``contracts`` (``lock``, ``check``) and ``catalog`` to the ``eventbus`` subcommands."""
    p = sub.add_parser("contracts", help="lock the event contracts, or check the code against the lock")
    actions = p.add_subparsers(dest="contracts_command", required=True)
    lock = actions.add_parser("lock", help=f"write the contracts' snapshot (default {DEFAULT_LOCK_FILE})")
    lock.add_argument("--file", default=DEFAULT_LOCK_FILE, help=f"the lock file (default {DEFAULT_LOCK_FILE})")
    lock.add_argument("--force", action="store_true", help="lock even breaking changes to locked versions")
    lock.set_defaults(func=cmd_contracts_lock)
    check = actions.add_parser("check", help="fail on a breaking change made without a new version")
    check.add_argument("--file", default=DEFAULT_LOCK_FILE, help=f"the lock file (default {DEFAULT_LOCK_FILE})")
    check.add_argument("--strict", action="store_true", help="also fail on notices: the lock is out of date")
    check.set_defaults(func=cmd_contracts_check)

    p = sub.add_parser("catalog", help="write the event catalog: AsyncAPI 3.0 (YAML) or Markdown")
    p.add_argument("--format", choices=("asyncapi", "markdown"), default="asyncapi")
    p.add_argument("--output", "-o", help="write to this file (default: standard output)")
    p.set_defaults(func=cmd_catalog)
