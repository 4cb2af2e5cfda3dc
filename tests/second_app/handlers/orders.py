"""Orders: a placed order is invoiced (a module that subscribes in ``initialize()``)."""

from __future__ import annotations

import json

from project.delivery import Event
from project.modules import BaseModule
from tests.second_app.imports import report_imports
from tests.second_app.keys import ShopKeys

ORDER_PLACED = "shop.order.placed"
INVOICE_ISSUED = "shop.invoice.issued"


class OrdersModule(BaseModule):
    """Issues one invoice per order: the invoice is stored, then announced."""

    queue = "shop"

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe(ORDER_PLACED, self.issue_invoice)
        # Initialized once in every process that loads the modules: the router and each
        # worker's main process, after everything they import up front.
        report_imports("initialize")

    def issue_invoice(self, event: Event) -> None:
        """Store the invoice for the order, then publish ``shop.invoice.issued``."""
        report_imports("issue_invoice")
        order = event["data"]
        invoice = {"order_id": order["order_id"], "amount_cents": order["amount_cents"]}
        invoices = ShopKeys(self.bus.keys.prefix).invoices
        self.bus.sync_client().hset(invoices, str(order["order_id"]), json.dumps(invoice))
        self.publish_sync(INVOICE_ISSUED, invoice)
