"""A small application for the test kit's own tests (``modules=["tests.kit.app"]``).

Contracts, a typed handler, an untyped one, an async one, one that fails, and one that
re-publishes what it handles (the loop guard must stop it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from project.event import Event
from project.events import event_bus
from project.modules import BaseModule


@event_bus.event("kit.order.placed", version=1)
class OrderPlacedV1(BaseModel):
    """Version 1: the total in cents."""

    total_cents: int = Field(ge=0)


@event_bus.event("kit.order.placed", version=2)
class OrderPlaced(BaseModel):
    """Version 2: the total as an amount and a currency."""

    amount: int = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


@event_bus.upcaster("kit.order.placed", from_version=1)
def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount": data["total_cents"], "currency": "EUR"}


@event_bus.event("kit.invoice.sent", version=1)
class InvoiceSent(BaseModel):
    """An invoice went out for an order."""

    amount: int
    currency: str


seen: list[Any] = []  # what the handlers received, for the tests to look at


class BillingModule(BaseModule):
    """Typed: bills each order; publishes kit.invoice.sent."""

    publishes = ("kit.invoice.sent",)

    async def initialize(self) -> None:
        await super().initialize()
        self.subscribe("kit.order.placed", self.bill)

    def bill(self, event: Event[OrderPlaced]) -> None:
        seen.append(("bill", event.data, event.version))
        if event.data.amount == 13:
            raise RuntimeError("unlucky amount")
        self.publish_sync(InvoiceSent(amount=event.data.amount, currency=event.data.currency), user_id=event.user_id)


@event_bus.subscribe("kit.#", queue="audit")
async def audit(event: Event) -> None:
    """Async and untyped: every kit.* event, as the envelope dict."""
    seen.append(("audit", event["event_type"], event["data"]))


@event_bus.subscribe("kit.loop.ping", queue="audit")
def ping_again(event: Event) -> None:
    """Re-publishes the event it handles: stopped by EVENTS_MAX_HOPS."""
    event_bus.publish_sync("kit.loop.ping", {"n": event["data"]["n"] + 1})
