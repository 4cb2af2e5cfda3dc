"""Synthesis: every module's profile of a user, combined with the cosmic conditions."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from project.celery_app import app
from project.context import handling
from project.events import event_bus
from tasks.db import engine
from tasks.tables import module_profiles, syntheses, users

__all__ = ["QUEUE", "fan_out", "synthesize_chunk", "synthesize_users"]

log = logging.getLogger(__name__)

QUEUE = "synthesis"


def cosmic_conditions() -> dict[str, Any]:
    """The latest cosmic events, by type (kept up to date by the synthesis module)."""
    raw: Any = event_bus.sync_client().hgetall(event_bus.keys.cosmic_latest)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _summary(profiles: dict[str, Any], cosmic: dict[str, Any]) -> str:
    parts = []
    solar = profiles.get("solar")
    if solar:
        parts.append(f"Sun in {solar['sun_sign'].capitalize()} at {solar['degree_in_sign']} degrees")
    storm = cosmic.get("cosmic.solar_storm.detected")
    if storm:
        parts.append(f"geomagnetic storm {storm['severity']} (Kp {storm['kp_index']})")
    if "cosmic.full_moon" in cosmic:
        parts.append(f"full moon of {cosmic['cosmic.full_moon']['at'][:10]}")
    return "; ".join(parts) or "no profiles yet"


def synthesize_users(user_ids: list[int], cause: dict[str, Any]) -> int:
    """Synthesize each user, store it, and publish ``synthesis.completed`` for each."""
    cosmic = cosmic_conditions()
    done = []
    with engine().begin() as conn:
        rows = conn.execute(
            sa.select(module_profiles.c.user_id, module_profiles.c.module, module_profiles.c.profile).where(
                module_profiles.c.user_id.in_(user_ids)
            )
        )
        profiles: dict[int, dict[str, Any]] = {uid: {} for uid in user_ids}
        for row in rows:
            profiles[row.user_id][row.module] = row.profile
        now = datetime.now(UTC)
        for uid in user_ids:
            synthesis = {
                "modules": profiles[uid],
                "cosmic": cosmic,
                "summary": _summary(profiles[uid], cosmic),
            }
            stmt = insert(syntheses).values(
                user_id=uid, synthesis=synthesis, trigger_event_id=cause["event_id"], computed_at=now
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["user_id"],
                    set_={k: stmt.excluded[k] for k in ("synthesis", "trigger_event_id", "computed_at")},
                )
            )
            done.append(uid)
    # Published after the commit, so a handler of synthesis.completed finds the row.
    with handling(cause, "synthesis"):
        for uid in done:
            event_bus.publish_sync(
                "synthesis.completed", {"trigger": cause["event_type"]}, user_id=uid, module="synthesis"
            )
    return len(done)


def _active_user_chunks(size: int) -> Iterator[list[int]]:
    after = 0
    while True:
        with engine().connect() as conn:
            chunk = list(
                conn.execute(
                    sa.select(users.c.id).where(users.c.active, users.c.id > after).order_by(users.c.id).limit(size)
                ).scalars()
            )
        if not chunk:
            return
        yield chunk
        after = chunk[-1]


def fan_out(cause: dict[str, Any]) -> int:
    """Send one ``synthesize_chunk`` task per chunk of active users; return the number sent."""
    sent = 0
    for chunk in _active_user_chunks(event_bus.settings.synthesis_chunk_size):
        synthesize_chunk.apply_async((chunk, cause), queue=QUEUE)
        sent += 1
    log.info("synthesis for %s fanned out in %d chunks", cause["event_type"], sent)
    return sent


@app.task(  # type: ignore[untyped-decorator]
    name="tasks.synthesis.synthesize_chunk",
    autoretry_for=(sa.exc.OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def synthesize_chunk(user_ids: list[int], cause: dict[str, Any]) -> int:
    """Synthesize one chunk of users for a global event."""
    return synthesize_users(user_ids, cause)
