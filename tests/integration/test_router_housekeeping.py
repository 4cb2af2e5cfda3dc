"""The router forgets consumers that left for good, and never one that still owns entries."""

from __future__ import annotations

import pytest

import project.consumer
from project.consumer import ensure_group
from project.keys import ROUTER_GROUP
from project.registry import Registry
from project.router import Router
from tests.integration.conftest import Stack


def test_router_forgets_departed_consumers_but_keeps_those_with_pending_entries(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, keys = stack.redis, stack.bus().keys
    ensure_group(client, keys.stream, ROUTER_GROUP)
    stack.bus().publish_sync("user.created", user_id=1)
    client.xreadgroup(ROUTER_GROUP, "holder", {keys.stream: ">"})  # owns one pending entry
    client.xreadgroup(ROUTER_GROUP, "ghost", {keys.stream: ">"})  # owns nothing
    monkeypatch.setattr(project.consumer, "_DEPARTED_IDLE_MS", -1)

    router = Router(stack.settings, Registry(), consumer="live", client=client)
    router.loop.forget_departed()

    names = {c["name"].decode() for c in client.xinfo_consumers(keys.stream, ROUTER_GROUP)}
    assert names == {"holder"}
