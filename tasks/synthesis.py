"""Synthesis: every module's profile of a user, combined with the cosmic conditions."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa
from celery import Task
from sqlalchemy.dialects.postgresql import insert

from contracts import SynthesisCompleted
from project.celery_app import app
from project.context import handling
from project.errors import PublishOutcomeUnknown, PublishRefused
from project.events import event_bus
from tasks.db import engine
from tasks.keys import app_keys
from tasks.settings import get_app_settings
from tasks.tables import module_profiles, syntheses, users

__all__ = [
    "QUEUE",
    "chunk_task_id",
    "cosmic_conditions",
    "fan_out",
    "fold_cosmic",
    "publish_completed",
    "synthesize_chunk",
    "synthesize_users",
]

log = logging.getLogger(__name__)

QUEUE = "synthesis"
# The cosmic events whose order matters here (named as the cosmic checks publish them).
STORM_DETECTED = "cosmic.solar_storm.detected"
STORM_ENDED = "cosmic.solar_storm.ended"

# Fixed forever: a chunk's task id is a uuid5 name under it, so a fan-out sent again sends
# the same task ids.
_CHUNK_NAMESPACE = uuid.UUID("b1497cf6-62da-45e2-93c1-83673727708c")
_CHUNK_TIME_LIMIT_S = 300
# A chunk's claim outlives its hard time limit: no copy still runs when a claim lapses.
_CHUNK_CLAIM_S = _CHUNK_TIME_LIMIT_S + 60
_CONTENDED_RETRY_S = 5
_DONE, _RUNNING = b"done", b"running"


def cosmic_conditions() -> dict[str, Any]:
    """The latest cosmic events, by type (kept up to date by the synthesis module)."""
    raw: Any = event_bus.sync_client().hgetall(app_keys(event_bus).cosmic_latest)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _started_before(data: Mapping[str, Any], other: Mapping[str, Any] | None, or_same: bool = False) -> bool:
    # Storms are ordered by their start (UTC ISO-8601, so strings compare as times). An event
    # without one (published by hand) is ordered before or after nothing.
    mine, theirs = data.get("started_at"), (other or {}).get("started_at")
    if not isinstance(mine, str) or not isinstance(theirs, str):
        return False
    return mine <= theirs if or_same else mine < theirs


def fold_cosmic(event_type: str, data: Mapping[str, Any]) -> None:
    """Fold a cosmic event into the latest conditions.

    A storm's end clears that storm's conditions, so no later synthesis describes it; its
    start arriving after its end (handlers run in parallel and retry) is ignored. Idempotent:
    folding the same event again changes nothing.
    """
    key = app_keys(event_bus).cosmic_latest

    def fold(pipe: redis.client.Pipeline) -> None:
        raw: Any = pipe.hgetall(key)
        latest = {k.decode(): json.loads(v) for k, v in raw.items()}
        pipe.multi()
        if event_type == STORM_ENDED:
            if _started_before(data, latest.get(STORM_ENDED)):
                return  # a later storm ended already
            if not _started_before(data, latest.get(STORM_DETECTED)):  # not a later storm's start
                pipe.hdel(key, STORM_DETECTED)
        elif event_type == STORM_DETECTED and _started_before(data, latest.get(STORM_ENDED), or_same=True):
            return  # this storm is over already
        pipe.hset(key, event_type, json.dumps(data))

    # WATCH the hash: a fold racing another one starts again with what that one wrote.
    event_bus.sync_client().transaction(fold, key)


def _summary(profiles: dict[str, Any], cosmic: dict[str, Any]) -> str:
    parts = []
    solar = profiles.get("solar")
    if solar:
        parts.append(f"Sun in {solar['sun_sign'].capitalize()} at {solar['degree_in_sign']} degrees")
    storm = cosmic.get(STORM_DETECTED)
    if storm:
        parts.append(f"geomagnetic storm {storm['severity']} (Kp {storm['kp_index']})")
    if "cosmic.full_moon" in cosmic:
        parts.append(f"full moon of {cosmic['cosmic.full_moon']['at'][:10]}")
    return "; ".join(parts) or "no profiles yet"


def synthesize_users(conn: sa.Connection, user_ids: list[int], cause: Mapping[str, Any]) -> list[int]:
    """Synthesize and store each user on ``conn`` (the caller's transaction); return them, in order."""
    cosmic = cosmic_conditions()
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
        synthesis = {"modules": profiles[uid], "cosmic": cosmic, "summary": _summary(profiles[uid], cosmic)}
        stmt = insert(syntheses).values(
            user_id=uid, synthesis=synthesis, trigger_event_id=cause["event_id"], computed_at=now
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["user_id"],
                set_={k: stmt.excluded[k] for k in ("synthesis", "trigger_event_id", "computed_at")},
            )
        )
    return list(user_ids)


def publish_completed(user_ids: list[int], cause: Mapping[str, Any]) -> None:
    """Publish ``synthesis.completed`` for each user, in order (so a rerun makes the same ids)."""
    for uid in user_ids:
        event_bus.publish_sync(SynthesisCompleted(trigger=cause["event_type"]), user_id=uid, module="synthesis")


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


def chunk_task_id(event_id: str, index: int) -> str:
    """The task id of the ``index``-th chunk of the fan-out for ``event_id``.

    By index rather than by the users in it: if users leave between a fan-out and its retry,
    the chunks shift down onto users the first run's chunks covered, and are skipped as done;
    nobody is synthesized twice.
    """
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{event_id}/{index}"))


def fan_out(cause: Mapping[str, Any]) -> int:
    """Send one ``synthesize_chunk`` task per chunk of active users; return the number of chunks.

    Safe to call again for the same event (the handler calling it is retried): each chunk
    keeps its task id, and a chunk task that ran already is skipped.
    """
    sent = 0
    envelope = dict(cause)  # the plain envelope: what goes over the wire is JSON
    for index, chunk in enumerate(_active_user_chunks(get_app_settings().synthesis_chunk_size)):
        task_id = chunk_task_id(str(cause["event_id"]), index)
        synthesize_chunk.apply_async((chunk, envelope), queue=QUEUE, task_id=task_id)
        sent += 1
    log.info("synthesis for %s fanned out in %d chunks", cause["event_type"], sent)
    return sent


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="tasks.synthesis.synthesize_chunk",
    autoretry_for=(sa.exc.OperationalError, redis.RedisError, PublishRefused, PublishOutcomeUnknown),
    retry_backoff=True,
    max_retries=5,
    time_limit=_CHUNK_TIME_LIMIT_S,
)
def synthesize_chunk(self: Task, user_ids: list[int], cause: dict[str, Any]) -> int:
    """Synthesize one chunk of users for a global event, once per chunk task id.

    A claim in Redis (``running``, then ``done`` for ``DELIVERY_DONE_TTL_S``) lets one copy
    of a chunk run at a time and skips copies that come after it finished: a fan-out sent
    twice, or a message redelivered after its worker died. A copy that dies after the
    commit is run again once its claim lapses; the writes are upserts and the events it
    publishes have ids derived from the chunk task id, so the effect is the same.
    """
    task_id = str(self.request.id)
    client = event_bus.sync_client()
    key = app_keys(event_bus).synthesis_chunk(task_id)
    if not client.set(key, _RUNNING, nx=True, ex=_CHUNK_CLAIM_S):
        if client.get(key) == _DONE:
            log.info("synthesis chunk %s of %s ran already; skipped", task_id, cause["event_id"])
            return 0
        # Another copy runs (it takes seconds), or died holding the claim (which lapses after
        # _CHUNK_CLAIM_S): look again soon, for as long as it takes.
        raise self.retry(countdown=min(max(1, int(client.ttl(key))), _CONTENDED_RETRY_S), max_retries=None)  # type: ignore[arg-type]
    try:
        with handling(cause, "synthesis", delivery_id=task_id):
            with engine().begin() as conn:
                done = synthesize_users(conn, user_ids, cause)
            # After the commit, so a handler of synthesis.completed finds the row.
            publish_completed(done, cause)
    except BaseException:
        client.delete(key)  # not done: the retry (or the next copy) runs it
        raise
    client.set(key, _DONE, ex=event_bus.settings.delivery_done_ttl_s)
    return len(done)
