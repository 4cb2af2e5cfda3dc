"""events_log and event_deliveries

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events_log",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("event_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text()),
        sa.Column("module", sa.Text()),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("causation_id", postgresql.UUID(as_uuid=False)),
        sa.Column("correlation_id", postgresql.UUID(as_uuid=False)),
        sa.Column("hops", sa.Integer(), nullable=False, server_default="0"),
        sa.UniqueConstraint("event_id", name="events_log_event_id_key"),
    )
    op.create_index("ix_events_log_event_type_occurred_at", "events_log", ["event_type", "occurred_at"])
    op.create_index("ix_events_log_user_id", "events_log", ["user_id"])
    op.create_index("ix_events_log_correlation_id", "events_log", ["correlation_id"])

    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("event_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("handler", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text()),
        sa.Column("task_id", postgresql.UUID(as_uuid=False)),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("event_id", "handler", name="uq_event_deliveries_event_id_handler"),
        sa.CheckConstraint(
            "status IN ('dispatched', 'started', 'succeeded', 'retrying', 'failed', 'dead')",
            name="ck_event_deliveries_status",
        ),
    )
    op.create_index("ix_event_deliveries_status", "event_deliveries", ["status"])


def downgrade() -> None:
    op.drop_table("event_deliveries")
    op.drop_table("events_log")
