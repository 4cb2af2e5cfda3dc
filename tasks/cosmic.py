"""Periodic cosmic checks, run by celery beat: solar storms (NOAA SWPC Kp) and the full moon.

Each check is a thin Celery task around a function that takes the bus, so the logic is
tested without a scheduler. A check never raises out of the task for a bad feed or a failed
publish: it logs and tries again at the next interval. Every event a check publishes has an
event_id derived from what it announces, so trying again never makes a second event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import ephem
import redis

from project.bus import EventBus
from project.celery_app import app
from project.errors import EventBusError
from project.events import event_bus
from tasks.keys import app_keys
from tasks.settings import get_app_settings

__all__ = [
    "FULL_MOON",
    "STORM_DETECTED",
    "STORM_ENDED",
    "FeedError",
    "announce_full_moon",
    "check_full_moon",
    "check_solar_storms",
    "detect_solar_storm",
    "full_moon_event_id",
    "parse_kp_feed",
    "storm_event_id",
    "storm_severity",
]

log = logging.getLogger(__name__)

_MAX_FEED_BYTES = 5 * 1024 * 1024
_FULL_MOON_WINDOW = timedelta(days=1)
# Held while a storm check reads and writes the storm state; longer than a check can take.
_CHECK_LOCK_S = 60
# Fixed forever: the event_ids of cosmic events are uuid5 names under it.
_COSMIC_NAMESPACE = uuid.UUID("62098528-58fe-4cf6-8cd4-0dd6e748a2b6")

STORM_DETECTED = "cosmic.solar_storm.detected"
STORM_ENDED = "cosmic.solar_storm.ended"
FULL_MOON = "cosmic.full_moon"


class FeedError(Exception):
    """Raised when the Kp feed cannot be fetched or does not hold Kp readings."""


def storm_severity(kp: float) -> str | None:
    """NOAA's G scale: Kp 5, 6, 7, 8, 9 are G1..G5; below 5 is no storm."""
    if kp < 5:
        return None
    return f"G{min(5, int(kp) - 4)}"


def _iso(time_tag: str) -> str:
    # One spelling for both formats ("2024-05-10 09:00:00.000", "2024-05-11T03:00:00"), so
    # time tags sort and compare as strings and a storm's event_id does not depend on it.
    moment = datetime.fromisoformat(time_tag)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # SWPC's time tags are UTC
    return moment.astimezone(UTC).isoformat()


def parse_kp_feed(payload: bytes) -> list[tuple[str, float]]:
    """``[(time_tag, kp), ...]`` oldest first, from either format SWPC has served.

    Time tags come back as UTC ISO-8601 (``2024-05-10T09:00:00+00:00``).

    The older format is a table with a header row (``[["time_tag", "Kp", ...], [...], ...]``),
    the newer a list of objects (``[{"time_tag": ..., "Kp": ...}, ...]``).
    """
    try:
        rows = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"feed is not JSON: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise FeedError("feed is not a non-empty JSON list")
    readings: list[tuple[str, float]] = []
    try:
        if isinstance(rows[0], list):
            header = [str(h).lower() for h in rows[0]]
            t, k = header.index("time_tag"), header.index("kp")
            readings = [(str(r[t]), float(r[k])) for r in rows[1:]]
        else:
            readings = [(str(r["time_tag"]), float(r.get("Kp", r.get("kp")))) for r in rows]
        readings = [(_iso(time_tag), kp) for time_tag, kp in readings]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise FeedError(f"feed rows are not Kp readings: {exc!r}") from None
    if not readings or not all(0 <= kp <= 9 for _, kp in readings):
        raise FeedError("feed holds no Kp reading in 0..9")
    return sorted(readings)


def fetch_kp_feed(url: str, timeout_s: float) -> list[tuple[str, float]]:
    """Download and parse the Kp feed; raise :class:`FeedError` for any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            payload = response.read(_MAX_FEED_BYTES + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise FeedError(f"cannot fetch {url}: {exc}") from None
    if len(payload) > _MAX_FEED_BYTES:
        raise FeedError(f"feed is larger than {_MAX_FEED_BYTES} bytes")
    return parse_kp_feed(payload)


def storm_event_id(event_type: str, started_at: str) -> str:
    """The event_id of a storm's ``detected`` or ``ended`` event: the same for every check.

    Derived from the storm's start, so a check that publishes again after a failure (or two
    checks racing) makes the same event, which publish stores once.
    """
    return str(uuid.uuid5(_COSMIC_NAMESPACE, f"{event_type}/{started_at}"))


def full_moon_event_id(stamp: str) -> str:
    """The event_id of the ``cosmic.full_moon`` event for the full moon at ``stamp``."""
    return str(uuid.uuid5(_COSMIC_NAMESPACE, f"{FULL_MOON}/{stamp}"))


def _storm_start(readings: list[tuple[str, float]]) -> str:
    # The first reading of the run of storm-level readings that ends with the latest one:
    # the same for every poll of one storm, even if the stored state was lost.
    start = readings[-1][0]
    for time_tag, kp in reversed(readings):
        if storm_severity(kp) is None:
            break
        start = time_tag
    return start


def _peak(state: dict[str, Any], readings: list[tuple[str, float]], until: str | None) -> None:
    # Every storm-level reading of this storm counts, also those a missed poll never saw.
    for time_tag, kp in readings:
        severity = storm_severity(kp)
        if time_tag < state["started_at"] or (until is not None and time_tag >= until) or severity is None:
            continue
        if kp > state["peak_kp_index"]:
            state["peak_kp_index"], state["peak_severity"] = kp, severity
        state["last_storm_at"] = max(state["last_storm_at"], time_tag)


def _first_calm_after(time_tag: str, readings: list[tuple[str, float]]) -> str | None:
    # "The first reading below Kp 5 ends it", also when a poll missed that reading.
    return next((t for t, kp in readings if t > time_tag and storm_severity(kp) is None), None)


def _publish_detected(bus: EventBus, state: dict[str, Any]) -> str:
    return bus.publish_sync(
        STORM_DETECTED,
        {
            "kp_index": state["kp_index"],
            "severity": state["severity"],
            "observed_at": state["observed_at"],
            "started_at": state["started_at"],
            "timestamp": datetime.now(UTC).isoformat(),
        },
        module="cosmic",
        event_id=storm_event_id(STORM_DETECTED, state["started_at"]),
    )


def _publish_ended(bus: EventBus, state: dict[str, Any]) -> str:
    started, ended = datetime.fromisoformat(state["started_at"]), datetime.fromisoformat(state["ended_at"])
    return bus.publish_sync(
        STORM_ENDED,
        {
            "peak_severity": state["peak_severity"],
            "peak_kp_index": state["peak_kp_index"],
            "started_at": state["started_at"],
            "ended_at": state["ended_at"],
            "duration_s": max(0, int((ended - started).total_seconds())),
            "timestamp": datetime.now(UTC).isoformat(),
        },
        module="cosmic",
        event_id=storm_event_id(STORM_ENDED, state["started_at"]),
    )


def detect_solar_storm(bus: EventBus, readings: list[tuple[str, float]]) -> str | None:
    """Track the storm in progress; publish its start and its end once each.

    ``readings`` are ``parse_kp_feed``'s, oldest first. Returns the event_id of the event
    this check published (``cosmic.solar_storm.detected`` or ``.ended``), or None.

    The storm is kept in Redis with its peak. Each step is written down before its event
    is published and marked done only after publish returned, so a publish that fails is
    done again by the next check, with the same event_id: announced once, never lost.

    Raises:
        redis.RedisError, EventBusError: Redis or publish failed; the next check resumes.
    """
    client, keys = bus.sync_client(), app_keys(bus)
    key = keys.storm_state
    lock = client.lock(keys.storm_check_lock, timeout=_CHECK_LOCK_S, blocking=False)
    if not lock.acquire():
        log.info("solar storm check skipped: another check is running")
        return None
    try:
        return _step(bus, client, key, readings)
    finally:
        # Never mask what the check raised; a lock not released lapses after _CHECK_LOCK_S.
        with contextlib.suppress(redis.RedisError):
            lock.release()


def _step(bus: EventBus, client: redis.Redis, key: str, readings: list[tuple[str, float]]) -> str | None:
    raw = client.get(key)
    state: dict[str, Any] | None = json.loads(raw) if raw else None  # type: ignore[arg-type]
    time_tag, kp = readings[-1]
    severity = storm_severity(kp)
    published = None
    if state is not None and "ended_at" not in state:
        ended = _first_calm_after(state["last_storm_at"], readings)
        _peak(state, readings, until=ended)
        if ended is None and severity is None:  # no calm reading after the storm: a feed gone back in time
            ended = max(time_tag, state["last_storm_at"])
        if ended is not None:
            state["ended_at"] = ended
        client.set(key, json.dumps(state))
    if state is not None and not state["announced"]:  # its start was never published
        published = _publish_detected(bus, state)
        state["announced"] = True
        client.set(key, json.dumps(state))
    if state is not None and "ended_at" in state:
        published = _publish_ended(bus, state)
        client.delete(key)
        state = None
    if state is None and severity is not None:
        started = _storm_start(readings)
        state = {
            "started_at": started, "observed_at": time_tag, "kp_index": kp, "severity": severity,
            "peak_kp_index": kp, "peak_severity": severity, "last_storm_at": time_tag, "announced": False,
        }  # fmt: skip
        _peak(state, readings, until=None)
        client.set(key, json.dumps(state))
        published = _publish_detected(bus, state)
        state["announced"] = True
        client.set(key, json.dumps(state))
    return published


def announce_full_moon(bus: EventBus, now: datetime) -> str | None:
    """Publish ``cosmic.full_moon`` once per full moon, within a day after it; return its event_id.

    The "announced" guard is set only after publish returned: a publish that fails is
    tried again by the next check, with the same event_id, so it is never lost nor doubled.
    """
    moon = ephem.previous_full_moon(ephem.Date(now.astimezone(UTC).replace(tzinfo=None)))
    moon_at = moon.datetime().replace(tzinfo=UTC)
    if now - moon_at > _FULL_MOON_WINDOW:
        return None
    stamp = moon_at.isoformat(timespec="minutes")
    client, guard = bus.sync_client(), app_keys(bus).full_moon(stamp)
    if client.exists(guard):
        return None
    event_id = bus.publish_sync(FULL_MOON, {"at": stamp}, module="cosmic", event_id=full_moon_event_id(stamp))
    client.set(guard, 1, ex=int(timedelta(days=40).total_seconds()))
    return event_id


@app.task(name="tasks.cosmic.check_solar_storms", ignore_result=True)  # type: ignore[untyped-decorator]
def check_solar_storms() -> str:
    """Beat task: poll the Kp feed; a bad feed or a failed publish is logged, not raised."""
    s = get_app_settings()
    try:
        readings = fetch_kp_feed(s.noaa_kp_url, s.noaa_timeout_s)
    except FeedError as exc:
        log.warning("solar storm check skipped: %s", exc)
        return "feed-unavailable"
    try:
        event_id = detect_solar_storm(event_bus, readings)
    except (redis.RedisError, EventBusError) as exc:
        log.error("solar storm check failed, the next one tries again: %r", exc)
        return "publish-failed"
    return f"storm {event_id}" if event_id else f"kp {readings[-1][1]}"


@app.task(name="tasks.cosmic.check_full_moon", ignore_result=True)  # type: ignore[untyped-decorator]
def check_full_moon() -> str:
    """Beat task: announce the full moon once; a failed publish is logged, not raised."""
    try:
        event_id = announce_full_moon(event_bus, datetime.now(UTC))
    except (redis.RedisError, EventBusError) as exc:
        log.error("full moon check failed, the next one tries again: %r", exc)
        return "publish-failed"
    return f"full moon {event_id}" if event_id else "not full"
