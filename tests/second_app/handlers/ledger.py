"""Ledger: every issued invoice is recorded (a plain function subscribed by decorator)."""

from __future__ import annotations

import json

from project.delivery import Event
from project.events import event_bus
from tests.second_app.imports import report_imports
from tests.second_app.keys import ShopKeys


@event_bus.subscribe("shop.invoice.issued", queue="shop")
def record_invoice(event: Event) -> None:
    """Append the invoice to the ledger."""
    report_imports("record_invoice")
    event_bus.sync_client().rpush(ShopKeys(event_bus.keys.prefix).ledger, json.dumps(event["data"]))
