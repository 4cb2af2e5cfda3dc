"""The catalog as a readable Markdown page: event types, their fields, publishers, handlers.

The page shows nothing of the environment it was made in (no host, port or prefix), so a
copy kept in the repository (``docs/catalog.md``) changes only when the application does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from project.catalog.model import DISPATCHER, Catalog, Channel, Handler
from project.contracts import Contract
from project.envelope import Envelope

__all__ = ["markdown_page"]

Schema = Mapping[str, Any]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _link(event_type: str) -> str:
    return f"[{_code(event_type)}](#{_anchor(event_type)})"


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _seconds(value: float) -> str:
    return f"{value:g} s"


class _Fields:
    """Field tables of one JSON Schema, its nested models (``$defs``) listed after it."""

    def __init__(self, schema: Schema) -> None:
        self.defs: Mapping[str, Any] = schema.get("$defs", {})

    def resolve(self, schema: Schema) -> Schema:
        if "$ref" in schema:
            target = self.defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
            return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def type_text(self, schema: Schema) -> str:
        if "$ref" in schema:
            return _code(str(schema["$ref"]).rsplit("/", 1)[-1])
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                return " | ".join(self.type_text(alt) for alt in schema[key])
        if "const" in schema:
            return json.dumps(schema["const"])
        if isinstance(schema.get("enum"), list):
            return " | ".join(json.dumps(v) for v in schema["enum"])
        kind = schema.get("type")
        if isinstance(kind, list):
            return " | ".join(str(k) for k in kind)
        if kind == "array":
            if "prefixItems" in schema:
                return "[" + ", ".join(self.type_text(s) for s in schema["prefixItems"]) + "]"
            items = schema.get("items")
            return f"list of {self.type_text(items)}" if isinstance(items, Mapping) else "list"
        if kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
            keys = schema.get("propertyNames")
            key_text = self.type_text(keys) if isinstance(keys, Mapping) else "string"
            return f"map of {key_text} to {self.type_text(schema['additionalProperties'])}"
        if kind == "string" and "format" in schema:
            return f"string ({schema['format']})"
        return str(kind) if kind else "any"

    def constraints(self, schema: Schema) -> str:
        parts: list[str] = []
        alternatives = [schema]
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                alternatives += [self.resolve(alt) for alt in schema[key]]
        for alt in alternatives:
            for key, text in (
                ("minimum", ">= {}"),
                ("exclusiveMinimum", "> {}"),
                ("maximum", "<= {}"),
                ("exclusiveMaximum", "< {}"),
                ("multipleOf", "multiple of {}"),
                ("minLength", "length >= {}"),
                ("maxLength", "length <= {}"),
                ("minItems", "items >= {}"),
                ("maxItems", "items <= {}"),
                ("minProperties", "entries >= {}"),
                ("maxProperties", "entries <= {}"),
                ("pattern", "pattern `{}`"),
            ):
                if key in alt:
                    parts.append(text.format(alt[key]))
            if alt.get("uniqueItems"):
                parts.append("unique items")
        return ", ".join(dict.fromkeys(parts))

    def table(self, schema: Schema) -> list[str]:
        schema = self.resolve(schema)
        props: Mapping[str, Any] = schema.get("properties", {})
        if not props:
            return ["No fields.", ""]
        required = set(schema.get("required", ()))
        rows = []
        for name, prop in props.items():
            if name in required:
                needed = "yes"
            else:
                needed = f"no (default {json.dumps(prop['default'])})" if "default" in prop else "no"
            rows.append(
                (_code(name), self.type_text(prop), needed, self.constraints(prop), str(prop.get("description", "")))
            )
        lines = _table(("field", "type", "required", "constraints", "description"), rows)
        if schema.get("additionalProperties") is False:
            lines.insert(0, "Unknown fields are refused.\n")
        return lines

    def nested(self) -> list[str]:
        lines: list[str] = []
        for name in sorted(self.defs):
            lines += [f"Nested model {_code(name)}:", "", *self.table(self.defs[name])]
        return lines


def _receives(handler: Handler) -> str:
    if handler.model is None:
        return "envelope dict"
    name = _code(handler.model.rsplit(".", 1)[-1])
    return name if handler.model_version is None else f"{name} (version {handler.model_version})"


def _handlers_table(handlers: tuple[Handler, ...]) -> list[str]:
    rows = [
        (
            _code(h.name),
            ", ".join(_code(p) for p in h.patterns),
            h.queue,
            _receives(h),
            str(h.max_retries),
            f"{_seconds(h.backoff_s)} .. {_seconds(h.backoff_max_s)}",
            f"{_seconds(h.time_limit_s)} (soft {_seconds(h.soft_time_limit_s)})",
        )
        for h in handlers
    ]
    return _table(("handler", "pattern", "queue", "receives", "retries", "backoff", "time limit"), rows)


def _version(contract: Contract) -> list[str]:
    schema = contract.json_schema()
    fields = _Fields(schema)
    return [f"#### Version {contract.version}: {_code(contract.name)}", "", *fields.table(schema), *fields.nested()]


def _event_type(channel: Channel) -> list[str]:
    lines = [f"### {channel.address}", ""]
    if channel.description:
        lines += [channel.description, ""]
    publishers = ", ".join(_publisher(p) for p in channel.publishers) or "no module declares it"
    lines += [f"Published by: {publishers}.", ""]
    if not channel.contracts:
        lines += ["No contract: the data is any JSON object.", ""]
    for contract in channel.contracts:
        lines += _version(contract)
    if channel.upcasters:
        lines += ["Upcasters:", ""]
        lines += [f"- version {u.from_version} to {u.from_version + 1}: {_code(u.function)}" for u in channel.upcasters]
        lines += [""]
    if channel.handlers:
        lines += ["Handled by:", "", *_handlers_table(channel.handlers)]
    else:
        lines += ["Handled by: no subscription.", ""]
    return lines


def _publisher(name: str) -> str:
    return "the dispatcher (when a delivery gives up)" if name == DISPATCHER else _code(name)


def markdown_page(catalog: Catalog) -> str:
    """The catalog as Markdown, ending in one newline."""
    event_types = [c for c in catalog.channels if not c.is_pattern]
    patterns = [c for c in catalog.channels if c.is_pattern]
    lines = [
        "# Event catalog",
        "",
        "<!-- Written by `eventbus catalog --format markdown --output docs/catalog.md`; do not edit by hand. -->",
        "",
        f"Contracts from {', '.join(_code(m) for m in catalog.contract_modules) or 'no package'}, handlers from "
        f"{', '.join(_code(m) for m in catalog.handler_modules) or 'no package'}. The same information as an "
        "AsyncAPI 3.0 document: `eventbus catalog`.",
        "",
        "## Event types",
        "",
    ]
    rows = []
    for channel in event_types:
        versions = ", ".join(str(c.version) for c in channel.contracts) or "untyped"
        rows.append(
            (
                _link(channel.address),
                versions,
                ", ".join(_publisher(p) for p in channel.publishers),
                ", ".join(_code(h.name) for h in channel.handlers),
            )
        )
    lines += _table(("event type", "versions", "published by", "handled by"), rows)
    if catalog.publishers:
        lines += ["## Publishing modules", ""]
        rows = [
            (_code(p.name), p.queue or "", _code(p.cls), ", ".join(_link(t) for t in p.publishes))
            for p in catalog.publishers
        ]
        lines += _table(("module", "queue", "class", "publishes"), rows)
    lines += [
        "## The envelope",
        "",
        "Every event travels in this envelope; the tables below describe its `data`.",
        "",
        *_Fields(Envelope.model_json_schema()).table(Envelope.model_json_schema()),
    ]
    lines += ["## Event types in detail", ""]
    for channel in event_types:
        lines += _event_type(channel)
    if patterns:
        lines += ["## Patterns matching no declared event type", ""]
        for channel in patterns:
            lines += [f"### {channel.address}", "", *_handlers_table(channel.handlers)]
    return "\n".join(lines).rstrip("\n") + "\n"
