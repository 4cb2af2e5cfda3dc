"""The catalog as an AsyncAPI 3.0 document: channels, messages, operations, JSON Schemas.

One channel per event type (its address), with one message per contract version whose
payload is the envelope with ``data`` replaced by that version's schema; one channel per
subscription pattern that matches no known event type (no address: a pattern is not a
destination). A subscription is a ``receive`` operation on each channel it matches, its
handler, queue and retry policy in ``x-eventbus-*`` fields; a module's declared
``publishes`` are ``send`` operations, and so is the dispatcher's own ``module.error``.
Schemas are pydantic's, generated together so nested models resolve under
``#/components/schemas``. Keys come out in a fixed order: the same configuration gives the
same document.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import project
from project.catalog.model import DISPATCHER, Catalog, Channel, Handler
from project.contracts import Contract
from project.envelope import Envelope
from project.keys import Keys
from project.settings import Settings

__all__ = ["asyncapi_document", "render_yaml"]

ASYNCAPI_VERSION = "3.0.0"
_REF = "#/components/schemas/{model}"


def _channel_id(address: str) -> str:
    # Channel and operation keys allow only [A-Za-z0-9_-]. Event names are [a-z0-9_] segments
    # joined by dots, each starting with a letter, so "." -> "-" and a wildcard -> "-_star" /
    # "-_hash" can collide with nothing.
    return address.replace(".", "-").replace("*", "_star").replace("#", "_hash")


def _handler_id(name: str) -> str:
    return name.replace(".", "-")


def _server(settings: Settings) -> dict[str, Any]:
    url = urlsplit(settings.redis_url)
    host = url.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    # Written without asking Redis (the catalog is made offline): REDIS_CLUSTER says which
    # layout; unset, both are described.
    keys = Keys(settings.events_prefix)
    scoped = Keys(settings.events_prefix, cluster=True).of_scope("<scope>")
    per_scope = (
        f"their scope's stream `{scoped.stream}` (the scope is the event type's first segment; "
        "each scope's stream and keys share one hash slot)"
    )
    rabbitmq = "the durable RabbitMQ queue `<queue>` (CELERY_BROKER_URL)"
    if settings.redis_cluster:
        where, queue = f"On a Redis Cluster, events are added to {per_scope},", rabbitmq
    elif settings.redis_cluster is None:
        where = f"Events are added to the stream `{keys.stream}`, or on a Redis Cluster to {per_scope},"
        queue = rabbitmq if settings.broker_is_amqp else f"the list `{keys.celery_queue('<queue>')}`"
    else:
        where = f"Events are added to the stream `{keys.stream}`"
        queue = rabbitmq if settings.broker_is_amqp else f"the list `{keys.celery_queue('<queue>')}`"
    server: dict[str, Any] = {
        "host": f"{host}:{url.port}" if url.port else host,
        "protocol": "redis",
        "description": (
            f"{where} and announced on the pub/sub channel `{keys.channel('<event_type>')}`; each delivery "
            f"is a Celery task on {queue}." + (" Connections use TLS (rediss)." if url.scheme == "rediss" else "")
        ),
    }
    if url.path.strip("/"):
        server["pathname"] = url.path
    return server


class _Schemas:
    """Every model's JSON Schema, generated together under ``#/components/schemas``."""

    def __init__(self, models: list[type[BaseModel]]) -> None:
        inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in models]
        refs, defs = models_json_schema(inputs, ref_template=_REF)
        self.defs: dict[str, Any] = defs.get("$defs", {})
        self.refs = {model: refs[(model, mode)]["$ref"] for model, mode in inputs}

    def name(self, model: type[BaseModel]) -> str:
        return str(self.refs[model]).rsplit("/", 1)[-1]

    def envelope(self, event_type: str | None, contract: Contract | None) -> dict[str, Any]:
        """The envelope's schema, for one event type and (with a contract) one version."""
        schema: dict[str, Any] = copy.deepcopy(self.defs[self.name(Envelope)])
        props = schema["properties"]
        if event_type is not None:
            props["event_type"] = {"const": event_type, "type": "string", "title": "Event Type"}
        if contract is not None:
            props["data"] = {"$ref": self.refs[contract.model]}
            props["version"] = {
                "const": contract.version,
                "type": "integer",
                "title": "Version",
                "description": "The contract version the data was published as; an event without one "
                "(published before the contract existed) is read as the oldest version.",
            }
            schema["title"] = f"{event_type} v{contract.version}"
        elif event_type is not None:
            schema["title"] = f"{event_type} (untyped)"
        return schema


def _messages(channel: Channel) -> dict[str, str]:
    """Message key in the channel -> component message name."""
    if channel.is_pattern:
        return {"envelope": "envelope"}
    if not channel.contracts:
        return {"envelope": channel.address}
    return {f"v{c.version}": f"{channel.address}.v{c.version}" for c in channel.contracts}


def _message(channel: Channel, contract: Contract | None, payload_ref: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": channel.address if not channel.is_pattern else "envelope",
        "contentType": "application/json",
        "payload": {"$ref": payload_ref},
        "correlationId": {
            "description": "The event that started the chain (the first event's own event_id).",
            "location": "$message.payload#/correlation_id",
        },
    }
    if contract is not None:
        message["title"] = f"{contract.event_type} version {contract.version}"
        doc = contract.model.__dict__.get("__doc__")
        if isinstance(doc, str) and doc.strip():
            message["summary"] = doc.strip().splitlines()[0]
        message["x-eventbus-version"] = contract.version
        message["x-eventbus-model"] = contract.name
        message["x-eventbus-dataschema"] = contract.dataschema
    else:
        message["title"] = f"{channel.address} (no contract: free-form data)" if not channel.is_pattern else "envelope"
    return message


def _receive(handler: Handler, channel: Channel, channel_id: str) -> dict[str, Any]:
    limits = f"time limit {handler.time_limit_s:g} s (soft {handler.soft_time_limit_s:g} s)"
    policy = (
        f"Pattern {', '.join(handler.patterns)}, queue {handler.queue}: up to {handler.max_retries} retries, "
        f"backoff {handler.backoff_s:g} s doubling up to {handler.backoff_max_s:g} s, {limits}."
    )
    receives = "the envelope as a dict"
    if handler.model is not None:
        version = "" if handler.model_version is None else f" version {handler.model_version}"
        receives = f"`{handler.model}`{version} (earlier versions upcast)"
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "title": handler.name,
        **({"summary": handler.summary} if handler.summary else {}),
        "description": f"{policy} The handler receives {receives}.",
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{key}"} for key in _messages(channel)],
        "x-eventbus-handler": handler.name,
        "x-eventbus-module": handler.module,
        "x-eventbus-patterns": list(handler.patterns),
        "x-eventbus-queue": handler.queue,
        "x-eventbus-max-retries": handler.max_retries,
        "x-eventbus-backoff-s": handler.backoff_s,
        "x-eventbus-backoff-max-s": handler.backoff_max_s,
        "x-eventbus-time-limit-s": handler.time_limit_s,
        "x-eventbus-soft-time-limit-s": handler.soft_time_limit_s,
        "x-eventbus-model": handler.model,
        "x-eventbus-model-version": handler.model_version,
    }


def _send(publisher: str, channel: Channel, channel_id: str) -> dict[str, Any]:
    description = (
        "The dispatcher publishes it when a delivery gives up (dead), on behalf of the handler's module."
        if publisher == DISPATCHER
        else f"Module {publisher} declares that it publishes {channel.address}."
    )
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "title": f"{publisher} publishes {channel.address}",
        "description": description,
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{key}"} for key in _messages(channel)],
        "x-eventbus-module": publisher,
    }


def asyncapi_document(catalog: Catalog, settings: Settings) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``catalog``, as plain data (see :func:`render_yaml`)."""
    models: list[type[BaseModel]] = [Envelope]
    for channel in catalog.channels:
        models.extend(c.model for c in channel.contracts)
    schemas = _Schemas(models)
    component_schemas: dict[str, Any] = dict(sorted(schemas.defs.items()))
    component_messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in catalog.channels:
        channel_id = _channel_id(channel.address)
        messages = _messages(channel)
        if channel.contracts:
            for contract in channel.contracts:
                name = messages[f"v{contract.version}"]
                component_schemas[name] = schemas.envelope(channel.address, contract)
                component_messages[name] = _message(channel, contract, _REF.format(model=name))
        elif not channel.is_pattern:
            component_schemas[channel.address] = schemas.envelope(channel.address, None)
            component_messages[channel.address] = _message(channel, None, _REF.format(model=channel.address))
        else:
            component_messages.setdefault("envelope", _message(channel, None, schemas.refs[Envelope]))
        entry: dict[str, Any] = {"address": None if channel.is_pattern else channel.address}
        if channel.is_pattern:
            entry["title"] = f"pattern {channel.address}"
            entry["description"] = (
                f"Subscription pattern `{channel.address}`, which matches no declared event type: "
                "its handlers receive whatever matching event is published."
            )
            entry["x-eventbus-pattern"] = channel.address
        else:
            entry["title"] = channel.address
            if channel.description:
                entry["description"] = channel.description
            if channel.upcasters:
                entry["x-eventbus-upcasters"] = [
                    {"from-version": u.from_version, "function": u.function} for u in channel.upcasters
                ]
        entry["messages"] = {key: {"$ref": f"#/components/messages/{name}"} for key, name in messages.items()}
        channels[channel_id] = entry
        for publisher in channel.publishers:
            operations[f"send--{_handler_id(publisher)}--{channel_id}"] = _send(publisher, channel, channel_id)
        for handler in channel.handlers:
            operations[f"receive--{_handler_id(handler.name)}--{channel_id}"] = _receive(handler, channel, channel_id)
    prefix = settings.events_prefix
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": settings.catalog_title,
            "version": project.__version__,
            "description": (
                "Every event type, its contract versions, who publishes it and who handles it, as "
                f"configured: EVENT_CONTRACT_MODULES={','.join(catalog.contract_modules)}, "
                f"EVENT_HANDLER_MODULES={','.join(catalog.handler_modules)}, EVENTS_PREFIX={prefix}. "
                "Written by `eventbus catalog`."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"redis": _server(settings)},
        "channels": dict(sorted(channels.items())),
        "operations": dict(sorted(operations.items())),
        "components": {
            "schemas": dict(sorted(component_schemas.items())),
            "messages": dict(sorted(component_messages.items())),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Safe YAML without anchors: a schema used twice is written out twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(document: dict[str, Any]) -> str:
    """The document as YAML, keys in the document's own order."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
