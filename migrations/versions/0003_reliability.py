"""delivery status 'rejected'; the exactly-once helper's delivery_inbox; user_id's JSON value

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OLD = "status IN ('dispatched', 'started', 'succeeded', 'retrying', 'failed', 'dead')"
_NEW = "status IN ('dispatched', 'started', 'succeeded', 'retrying', 'failed', 'dead', 'rejected')"


def upgrade() -> None:
    op.drop_constraint("ck_event_deliveries_status", "event_deliveries", type_="check")
    op.create_check_constraint("ck_event_deliveries_status", "event_deliveries", _NEW)
    # user_id is text (for indexing); its JSON value (a number or a string) is kept beside
    # it, so an event rebuilt from the record (reconciler, redrive) is the event published.
    op.add_column("events_log", sa.Column("user_id_json", postgresql.JSONB()))
    op.create_table(
        "delivery_inbox",
        sa.Column("task_id", postgresql.UUID(as_uuid=False), primary_key=True),
        sa.Column("event_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("handler", sa.Text(), nullable=False),
        sa.Column("outbox", postgresql.JSONB(), nullable=False, server_default="[]"),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("delivery_inbox")
    op.drop_column("events_log", "user_id_json")
    op.drop_constraint("ck_event_deliveries_status", "event_deliveries", type_="check")
    op.create_check_constraint("ck_event_deliveries_status", "event_deliveries", _OLD)
