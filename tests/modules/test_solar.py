"""The solar module: new birth data gives a stored profile and module.profile.calculated."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from contracts import BirthDataUpdated
from project.testing import EventRecorder
from tasks.demo import create_demo_user
from tasks.solar import solar_profile
from tasks.tables import module_profiles, users

BORN = datetime(1990, 7, 24, 6, 30, tzinfo=UTC)


def test_new_birth_data_gives_a_profile_and_announces_it(events: EventRecorder, engine: sa.Engine) -> None:
    user = create_demo_user(engine, "ada", BORN)
    root = events.publish(BirthDataUpdated(user_id=user), user_id=user, module="demo")
    events.run()
    sign = solar_profile(BORN)["sun_sign"]
    profile = events.assert_published(
        "module.profile.calculated", user_id=user, data={"module": "solar", "signs": {"sun": sign}}, count=1
    )
    assert profile.causation_id == root and profile.version == 2
    with engine.connect() as conn:
        stored = conn.execute(sa.select(module_profiles.c.profile).where(module_profiles.c.user_id == user)).scalar()
    assert stored is not None and stored["sun_sign"] == sign
    # The chain goes on: synthesis picks the profile up.
    assert events.chain(root).event_types() == [
        "user.birth_data.updated",
        "module.profile.calculated",
        "synthesis.completed",
    ]


def test_a_user_without_birth_data_gets_no_profile(events: EventRecorder, engine: sa.Engine) -> None:
    with engine.begin() as conn:
        user = int(conn.execute(sa.insert(users).values(name="no-birth").returning(users.c.id)).scalar_one())
    events.publish(BirthDataUpdated(user_id=user), user_id=user, module="demo")
    events.run()
    events.assert_not_published("module.profile.calculated")
