"""The PostgreSQL tables of the event log (migrations/ creates them; the log writer fills them)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

__all__ = ["DELIVERY_STATUSES", "delivery_inbox", "event_deliveries", "events_log", "metadata", "operations_audit"]

metadata = MetaData()

# Later phases outrank earlier ones within an attempt; records may arrive out of order.
DELIVERY_STATUSES = {
    "dispatched": 0,
    "started": 1,
    "retrying": 2,
    "failed": 2,
    "succeeded": 3,
    "dead": 3,
    "rejected": 3,
}

events_log = Table(
    "events_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("event_id", UUID(as_uuid=False), nullable=False),
    Column("event_type", Text, nullable=False),
    Column("user_id", Text),
    Column("module", Text),
    Column("data", JSONB, nullable=False),
    # user_id's JSON value (number or string): user_id is text for indexing.
    Column("user_id_json", JSONB),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("causation_id", UUID(as_uuid=False)),
    Column("correlation_id", UUID(as_uuid=False)),
    Column("hops", Integer, nullable=False, server_default="0"),
    Column("version", Integer),  # the contract version of its data (project.contracts), or null
    Column("replay_of", UUID(as_uuid=False)),  # a replay's original event (project.operations)
    UniqueConstraint("event_id", name="events_log_event_id_key"),
    Index("ix_events_log_event_type_occurred_at_id", "event_type", "occurred_at", "id"),
    Index("ix_events_log_correlation_id", "correlation_id"),
    # The explorer's lists (project.explorer), newest first from a keyset cursor (migration 0006).
    Index("ix_events_log_occurred_at_id", "occurred_at", "id"),
    Index("ix_events_log_user_id_occurred_at_id", "user_id", "occurred_at", "id"),
    Index("ix_events_log_module_occurred_at_id", "module", "occurred_at", "id"),
)

event_deliveries = Table(
    "event_deliveries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("event_id", UUID(as_uuid=False), nullable=False),
    Column("handler", Text, nullable=False),
    Column("queue", Text),
    Column("task_id", UUID(as_uuid=False)),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # When `eventbus redrive` last sent it again, and how many times it did (project.operations).
    Column("redriven_at", DateTime(timezone=True)),
    Column("redrives", Integer, nullable=False, server_default="0"),
    UniqueConstraint("event_id", "handler", name="uq_event_deliveries_event_id_handler"),
    CheckConstraint(
        "status IN ('dispatched', 'started', 'succeeded', 'retrying', 'failed', 'dead', 'rejected')",
        name="ck_event_deliveries_status",
    ),
    Index("ix_event_deliveries_status", "status"),
    # The explorer's "has failed deliveries", its problems and its overview (migration 0006);
    # the first two hold only the (few) failed deliveries.
    Index("ix_event_deliveries_failed", "event_id", postgresql_where=text("status IN ('failed', 'dead', 'rejected')")),
    Index(
        "ix_event_deliveries_problems", "handler", "updated_at", postgresql_where=text("status IN ('dead', 'rejected')")
    ),
    Index("ix_event_deliveries_created_at", "created_at", postgresql_include=["status"]),
)

# The inbox of the exactly-once helper (``event.transaction()``): a row per delivery whose
# effects committed, written in the same transaction as those effects, with the events the
# handler published inside it (sent after the commit, and again if a crash came between).
delivery_inbox = Table(
    "delivery_inbox",
    metadata,
    Column("task_id", UUID(as_uuid=False), primary_key=True),
    Column("event_id", UUID(as_uuid=False), nullable=False),
    Column("handler", Text, nullable=False),
    Column("outbox", JSONB, nullable=False, server_default="[]"),
    Column("handled_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# One line per redrive, replay or backfill run: who, when, which filter, how many.
operations_audit = Table(
    "operations_audit",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", Text, nullable=False),
    Column("operation", Text, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("filter", JSONB, nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("selected", Integer, nullable=False),
    Column("sent", Integer, nullable=False),
    Column("skipped", Integer, nullable=False),
)
