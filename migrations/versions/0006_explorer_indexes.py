"""indexes for the events explorer: lists by time, type, user and module; failed deliveries; deliveries by time

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_FAILED = sa.text("status IN ('failed', 'dead', 'rejected')")
_PROBLEMS = sa.text("status IN ('dead', 'rejected')")


def upgrade() -> None:
    # CONCURRENTLY: on a large record the log writer keeps writing while they are built (its
    # rows would wait in the Redis buffer otherwise); that needs statements outside a transaction.
    with op.get_context().autocommit_block():
        # Every list is newest first from a keyset cursor on (occurred_at, id): alone, and
        # within one event type, user or module.
        _create("ix_events_log_occurred_at_id", "events_log", ["occurred_at", "id"])
        _create("ix_events_log_event_type_occurred_at_id", "events_log", ["event_type", "occurred_at", "id"])
        _create("ix_events_log_user_id_occurred_at_id", "events_log", ["user_id", "occurred_at", "id"])
        _create("ix_events_log_module_occurred_at_id", "events_log", ["module", "occurred_at", "id"])
        # Superseded by the two with id added: one index less for the log writer to keep.
        op.drop_index("ix_events_log_event_type_occurred_at", "events_log", postgresql_concurrently=True, if_exists=True)
        op.drop_index("ix_events_log_user_id", "events_log", postgresql_concurrently=True, if_exists=True)
        # Partial: only failed deliveries, a small share. "Has failed deliveries" probes the
        # first by event; the problems page reads the second.
        _create("ix_event_deliveries_failed", "event_deliveries", ["event_id"], postgresql_where=_FAILED)
        _create("ix_event_deliveries_problems", "event_deliveries", ["handler", "updated_at"], postgresql_where=_PROBLEMS)
        # The overview's window: deliveries by status without a visit to the table.
        _create("ix_event_deliveries_created_at", "event_deliveries", ["created_at"], postgresql_include=["status"])


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in (
            ("ix_event_deliveries_created_at", "event_deliveries"),
            ("ix_event_deliveries_problems", "event_deliveries"),
            ("ix_event_deliveries_failed", "event_deliveries"),
        ):
            op.drop_index(name, table, postgresql_concurrently=True, if_exists=True)
        _create("ix_events_log_user_id", "events_log", ["user_id"])
        _create("ix_events_log_event_type_occurred_at", "events_log", ["event_type", "occurred_at"])
        for name in (
            "ix_events_log_module_occurred_at_id",
            "ix_events_log_user_id_occurred_at_id",
            "ix_events_log_event_type_occurred_at_id",
            "ix_events_log_occurred_at_id",
        ):
            op.drop_index(name, "events_log", postgresql_concurrently=True, if_exists=True)


def _create(name: str, table: str, columns: list[str], **kw: object) -> None:
    op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
