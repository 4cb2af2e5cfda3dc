"""The shop's Redis keys, all under the environment's ``EVENTS_PREFIX``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShopKeys"]


@dataclass(frozen=True, slots=True)
class ShopKeys:
    """The shop's key names for one environment."""

    prefix: str

    @property
    def invoices(self) -> str:
        """A hash: order_id -> the invoice issued for it (JSON)."""
        return f"{self.prefix}:shop:invoices"

    @property
    def ledger(self) -> str:
        """A list of the invoices recorded, in the order they were recorded (JSON)."""
        return f"{self.prefix}:shop:ledger"

    @property
    def imports(self) -> str:
        """A list of reports of which cosmic modules a process had imported (JSON)."""
        return f"{self.prefix}:shop:imports"
