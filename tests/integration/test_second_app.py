"""A second application runs on the dispatcher without any of the cosmic application.

The shop (``tests/second_app``) has its own handler package, event names and queue. Only
``EVENT_HANDLER_MODULES`` (and the prefix every test has) says which application runs; its
router, log writer and worker import no module of ``tasks`` or ``handlers``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import wait_for
from tests.integration.conftest import ROOT, Stack

SHOP = "tests.second_app.handlers"
ISSUE_INVOICE = f"{SHOP}.orders.OrdersModule.issue_invoice"
RECORD_INVOICE = f"{SHOP}.ledger.record_invoice"


def _reports(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(r) for r in stack.redis.lrange(f"{stack.prefix}:shop:imports", 0, -1)]


def test_a_second_application_runs_end_to_end_without_importing_the_cosmic_one(stack: Stack) -> None:
    stack.env["EVENT_HANDLER_MODULES"] = SHOP
    routes = subprocess.run(
        [sys.executable, "-m", "project.cli", "routes"],
        cwd=ROOT, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert routes.returncode == 0, routes.stderr
    assert sorted(line.split() for line in routes.stdout.splitlines()[1:]) == [
        ["shop.invoice.issued", RECORD_INVOICE, "shop"],
        ["shop.order.placed", ISSUE_INVOICE, "shop"],
    ], routes.stdout

    stack.start_worker(queues="shop")
    stack.start_router()  # with its log writer
    order = stack.bus().publish_sync("shop.order.placed", {"order_id": 7, "amount_cents": 1250}, module="test")

    # The handlers' effects: the invoice stored, announced, and recorded in the ledger.
    ledger = f"{stack.prefix}:shop:ledger"
    wait_for(lambda: stack.redis.llen(ledger) == 1, what="the invoice in the ledger")
    assert json.loads(stack.redis.lindex(ledger, 0)) == {"order_id": 7, "amount_cents": 1250}  # type: ignore[arg-type]
    assert json.loads(stack.redis.hget(f"{stack.prefix}:shop:invoices", "7")) == {  # type: ignore[arg-type]
        "order_id": 7, "amount_cents": 1250,
    }  # fmt: skip

    # On record: both events of the chain and both deliveries, succeeded.
    events = stack.wait_query(
        "SELECT event_id::text AS id, event_type, hops, correlation_id::text AS c FROM events_log ORDER BY hops",
        until=lambda r: len(r) == 2,
    )
    assert [(e.event_type, e.hops, e.c) for e in events] == [
        ("shop.order.placed", 0, order), ("shop.invoice.issued", 1, order)
    ]  # fmt: skip
    deliveries = stack.wait_query(
        "SELECT event_id::text AS e, handler, status FROM event_deliveries ORDER BY handler",
        until=lambda r: len(r) == 2 and all(d.status == "succeeded" for d in r),
    )
    assert {(d.e, d.handler) for d in deliveries} == {(events[0].id, ISSUE_INVOICE), (events[1].id, RECORD_INVOICE)}

    # Nothing of the cosmic application in any process: the router, the worker's main
    # process (both when they initialized the modules) and the pool processes that ran them.
    reports = _reports(stack)
    assert {r["where"] for r in reports} == {"initialize", "issue_invoice", "record_invoice"}, reports
    assert any("router" in r["argv"] for r in reports if r["where"] == "initialize"), reports
    assert any("worker" in r["argv"] for r in reports if r["where"] == "initialize"), reports
    assert [r for r in reports if r["cosmic"]] == []
