"""events_log.version: the contract version an event's data was published as

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null for an event type without a contract. An event rebuilt from the record (the
    # reconciler, a redrive or a replay) keeps it, so a typed handler upcasts it correctly.
    op.add_column("events_log", sa.Column("version", sa.Integer()))


def downgrade() -> None:
    op.drop_column("events_log", "version")
