"""redrive and replay on the record: event_deliveries.redriven_at/redrives, events_log.replay_of, operations_audit

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("event_deliveries", sa.Column("redriven_at", sa.DateTime(timezone=True)))
    op.add_column("event_deliveries", sa.Column("redrives", sa.Integer(), nullable=False, server_default="0"))
    # A replay delivers a copy of a past event under a new event_id; this names the original.
    op.add_column("events_log", sa.Column("replay_of", postgresql.UUID(as_uuid=False)))
    op.create_table(
        "operations_audit",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("filter", postgresql.JSONB(), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("selected", sa.Integer(), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("operations_audit")
    op.drop_column("events_log", "replay_of")
    op.drop_column("event_deliveries", "redrives")
    op.drop_column("event_deliveries", "redriven_at")
