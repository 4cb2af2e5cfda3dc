"""The solar profile: where the Sun stood on the ecliptic at a user's birth (with ephem)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

import ephem
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from tasks.tables import birth_data, module_profiles

__all__ = ["SIGNS", "recalculate", "solar_profile"]

log = logging.getLogger(__name__)

SIGNS = (
    "aries", "taurus", "gemini", "cancer", "leo", "virgo",
    "libra", "scorpio", "sagittarius", "capricorn", "aquarius", "pisces",
)  # fmt: skip


def solar_profile(born_at: datetime) -> dict[str, Any]:
    """The Sun's tropical ecliptic longitude (of date) and sign at ``born_at``."""
    when = ephem.Date(born_at.astimezone(UTC).replace(tzinfo=None))
    sun = ephem.Sun(when)
    ecliptic = ephem.Ecliptic(ephem.Equatorial(sun.ra, sun.dec, epoch=when), epoch=when)
    longitude = math.degrees(float(ecliptic.lon)) % 360.0
    return {
        "sun_longitude_deg": round(longitude, 4),
        "sun_sign": SIGNS[int(longitude // 30) % 12],
        "degree_in_sign": round(longitude % 30, 2),
        "born_at": born_at.astimezone(UTC).isoformat(),
    }


def recalculate(conn: sa.Connection, user_id: int, source_event_id: str | None) -> dict[str, Any] | None:
    """Compute and store the user's solar profile; None if the user has no birth data."""
    born_at = conn.execute(sa.select(birth_data.c.born_at).where(birth_data.c.user_id == user_id)).scalar()
    if born_at is None:
        log.warning("user %s has no birth data; no solar profile", user_id)
        return None
    profile = solar_profile(born_at)
    stmt = insert(module_profiles).values(
        user_id=user_id, module="solar", profile=profile, source_event_id=source_event_id,
        computed_at=datetime.now(UTC),
    )  # fmt: skip
    conn.execute(
        stmt.on_conflict_do_update(
            constraint="module_profiles_pkey",
            set_={k: stmt.excluded[k] for k in ("profile", "source_event_id", "computed_at")},
        )
    )
    return profile
