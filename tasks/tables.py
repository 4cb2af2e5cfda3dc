"""The application's tables: users, their birth data, module profiles and syntheses."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

__all__ = ["birth_data", "metadata", "module_profiles", "syntheses", "users"]

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("active", Boolean, nullable=False, server_default="true"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

birth_data = Table(
    "birth_data",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("born_at", DateTime(timezone=True), nullable=False),
    Column("latitude", Float),
    Column("longitude", Float),
    Column("place", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

module_profiles = Table(
    "module_profiles",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("module", Text, nullable=False),
    Column("profile", JSONB, nullable=False),
    Column("source_event_id", UUID(as_uuid=False)),
    Column("computed_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("user_id", "module", name="module_profiles_pkey"),
)

syntheses = Table(
    "syntheses",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("synthesis", JSONB, nullable=False),
    Column("trigger_event_id", UUID(as_uuid=False)),
    Column("computed_at", DateTime(timezone=True), nullable=False),
)
