"""Periodic cosmic checks, run by celery beat: solar storms (NOAA SWPC Kp) and the full moon.

Each check is a thin Celery task around a function that takes the bus, so the logic is
tested without a scheduler. A check never raises out of the task for a bad feed: it logs
and tries again at the next interval.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import ephem

from project.bus import EventBus
from project.celery_app import app
from project.events import event_bus

__all__ = [
    "FeedError",
    "announce_full_moon",
    "check_full_moon",
    "check_solar_storms",
    "detect_solar_storm",
    "parse_kp_feed",
    "storm_severity",
]

log = logging.getLogger(__name__)

_MAX_FEED_BYTES = 5 * 1024 * 1024
_FULL_MOON_WINDOW = timedelta(days=1)


class FeedError(Exception):
    """Raised when the Kp feed cannot be fetched or does not hold Kp readings."""


def storm_severity(kp: float) -> str | None:
    """NOAA's G scale: Kp 5, 6, 7, 8, 9 are G1..G5; below 5 is no storm."""
    if kp < 5:
        return None
    return f"G{min(5, int(kp) - 4)}"


def parse_kp_feed(payload: bytes) -> list[tuple[str, float]]:
    """``[(time_tag, kp), ...]`` oldest first, from either format SWPC has served.

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


def detect_solar_storm(bus: EventBus, readings: list[tuple[str, float]]) -> str | None:
    """Publish ``cosmic.solar_storm.detected`` once when a storm begins; return its event_id.

    The storm in progress is kept in Redis, so polls during the storm publish nothing and
    the first reading below Kp 5 ends it.
    """
    time_tag, kp = readings[-1]
    severity = storm_severity(kp)
    client = bus.sync_client()
    if severity is None:
        client.delete(bus.keys.storm_state)
        return None
    state = json.dumps({"started": time_tag, "kp_index": kp, "severity": severity})
    if not client.set(bus.keys.storm_state, state, nx=True):
        return None
    return bus.publish_sync(
        "cosmic.solar_storm.detected",
        {
            "kp_index": kp,
            "severity": severity,
            "observed_at": time_tag,
            "timestamp": datetime.now(UTC).isoformat(),
        },
        module="cosmic",
    )


def announce_full_moon(bus: EventBus, now: datetime) -> str | None:
    """Publish ``cosmic.full_moon`` once per full moon, within a day after it; return its event_id."""
    moon = ephem.previous_full_moon(ephem.Date(now.astimezone(UTC).replace(tzinfo=None)))
    moon_at = moon.datetime().replace(tzinfo=UTC)
    if now - moon_at > _FULL_MOON_WINDOW:
        return None
    stamp = moon_at.isoformat(timespec="minutes")
    if not bus.sync_client().set(bus.keys.full_moon(stamp), 1, nx=True, ex=int(timedelta(days=40).total_seconds())):
        return None
    return bus.publish_sync("cosmic.full_moon", {"at": stamp}, module="cosmic")


@app.task(name="tasks.cosmic.check_solar_storms", ignore_result=True)  # type: ignore[untyped-decorator]
def check_solar_storms() -> str:
    """Beat task: poll the Kp feed; a feed that is down, slow or garbage is logged, not raised."""
    s = event_bus.settings
    try:
        readings = fetch_kp_feed(s.noaa_kp_url, s.noaa_timeout_s)
    except FeedError as exc:
        log.warning("solar storm check skipped: %s", exc)
        return "feed-unavailable"
    event_id = detect_solar_storm(event_bus, readings)
    return f"storm {event_id}" if event_id else f"kp {readings[-1][1]}"


@app.task(name="tasks.cosmic.check_full_moon", ignore_result=True)  # type: ignore[untyped-decorator]
def check_full_moon() -> str:
    """Beat task: announce the full moon once."""
    event_id = announce_full_moon(event_bus, datetime.now(UTC))
    return f"full moon {event_id}" if event_id else "not full"
