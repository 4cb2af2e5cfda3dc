"""The application's pure parts: the solar profile, the Kp feed, the storm scale, its keys and settings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from project.settings import Settings
from tasks.cosmic import (
    STORM_DETECTED,
    STORM_ENDED,
    FeedError,
    full_moon_event_id,
    parse_kp_feed,
    storm_event_id,
    storm_severity,
)
from tasks.keys import AppKeys
from tasks.settings import AppSettings
from tasks.solar import solar_profile
from tasks.synthesis import chunk_task_id

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(
    ("moment", "longitude", "sign"),
    [
        (datetime(2000, 3, 20, 7, 35, tzinfo=UTC), 0.0, "aries"),  # March equinox 2000
        (datetime(2000, 6, 21, 1, 48, tzinfo=UTC), 90.0, "cancer"),  # June solstice
        (datetime(2000, 9, 22, 17, 28, tzinfo=UTC), 180.0, "libra"),  # September equinox
        (datetime(2000, 12, 21, 13, 37, tzinfo=UTC), 270.0, "capricorn"),  # December solstice
    ],
)
def test_sun_longitude_at_equinoxes_and_solstices(moment: datetime, longitude: float, sign: str) -> None:
    profile = solar_profile(moment)
    delta = (profile["sun_longitude_deg"] - longitude + 180) % 360 - 180
    assert abs(delta) < 0.05
    # At the exact boundary the sign can be either side; a day later it is the next sign.
    assert solar_profile(moment.replace(day=moment.day + 1))["sun_sign"] == sign


def test_solar_profile_of_a_birthday() -> None:
    profile = solar_profile(datetime(1990, 7, 14, 6, 30, tzinfo=UTC))
    assert profile["sun_sign"] == "cancer"
    assert 21 < profile["degree_in_sign"] < 22


@pytest.mark.parametrize(
    ("kp", "severity"), [(0.0, None), (4.67, None), (5.0, "G1"), (5.67, "G1"), (6.0, "G2"), (7.33, "G3"),
                         (8.0, "G4"), (8.67, "G4"), (9.0, "G5")],
)  # fmt: skip
def test_kp_maps_to_noaa_g_scale(kp: float, severity: str | None) -> None:
    assert storm_severity(kp) == severity


def test_feed_in_both_formats_parses_oldest_first() -> None:
    # Time tags in one spelling (UTC ISO-8601) whatever the format: they sort, compare and
    # name a storm's event_id alike.
    table = parse_kp_feed((DATA / "kp_storm.json").read_bytes())
    assert table[0] == ("2024-05-10T09:00:00+00:00", 4.0)
    assert table[-1] == ("2024-05-11T00:00:00+00:00", 8.33)
    objects = parse_kp_feed((DATA / "kp_storm_objects.json").read_bytes())
    assert objects[-1] == ("2024-05-11T03:00:00+00:00", 9.0)


def test_cosmic_event_ids_are_fixed_by_what_they_announce() -> None:
    start = "2024-05-10T12:00:00+00:00"
    assert storm_event_id(STORM_DETECTED, start) == storm_event_id(STORM_DETECTED, start)
    ids = {
        storm_event_id(STORM_DETECTED, start),
        storm_event_id(STORM_ENDED, start),
        storm_event_id(STORM_DETECTED, "2024-05-11T00:00:00+00:00"),
        full_moon_event_id("2024-01-25T17:54+00:00"),
    }
    assert len(ids) == 4
    assert all(uuid.UUID(i).version == 5 for i in ids)


def test_chunk_task_ids_are_fixed_by_event_and_index() -> None:
    assert chunk_task_id("e1", 0) == chunk_task_id("e1", 0)
    assert len({chunk_task_id("e1", 0), chunk_task_id("e1", 1), chunk_task_id("e2", 0)}) == 3


@pytest.mark.parametrize(
    "payload",
    [b"", b"<html>502 Bad Gateway</html>", b"[]", b"{}", b'[["time_tag"], ["x"]]', b'[{"Kp": 3}]',
     b'[["time_tag", "Kp"], ["t", "42"]]', b'[["time_tag", "Kp"], ["yesterday", "3"]]',
     (DATA / "kp_malformed.json").read_bytes()],
)  # fmt: skip
def test_garbage_feed_is_a_feed_error(payload: bytes) -> None:
    with pytest.raises(FeedError):
        parse_kp_feed(payload)


def test_application_keys_keep_their_names_under_the_prefix() -> None:
    # The names a running deployment already has in Redis: moving them must not orphan a
    # storm in progress or a user's working memory.
    keys = AppKeys("prod")
    assert (keys.storm_state, keys.storm_check_lock, keys.full_moon("2024-01-25T17:54+00:00")) == (
        "prod:cosmic:storm", "prod:cosmic:storm:check", "prod:cosmic:full_moon:2024-01-25T17:54+00:00"
    )  # fmt: skip
    assert (keys.cosmic_latest, keys.synthesis_chunk("c1")) == ("prod:cosmic:latest", "prod:synthesis:chunk:c1")
    assert (keys.memory_generation, keys.memory_user(3, "42")) == ("prod:memory:generation", "prod:memory:3:42")


def test_application_settings_are_read_from_the_same_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOAA_KP_URL", "http://127.0.0.1:9/kp.json")
    monkeypatch.setenv("SYNTHESIS_CHUNK_SIZE", "7")
    monkeypatch.setenv("MEMORY_TTL_S", "60")
    monkeypatch.setenv("STORM_CHECK_INTERVAL_S", "5")
    s = AppSettings()
    assert (s.noaa_kp_url, s.synthesis_chunk_size, s.memory_ttl_s, s.storm_check_interval_s) == (
        "http://127.0.0.1:9/kp.json", 7, 60, 5.0
    )  # fmt: skip
    assert (s.noaa_timeout_s, s.full_moon_check_interval_s) == (10.0, 3600.0)
    # The dispatcher's settings know none of them.
    assert not {"noaa_kp_url", "synthesis_chunk_size", "memory_ttl_s"} & set(Settings.model_fields)
