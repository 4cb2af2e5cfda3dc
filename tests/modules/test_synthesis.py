"""The synthesis engine: a new profile gives a stored synthesis and synthesis.completed."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from contracts import ProfileCalculated, ProfileCalculatedV1
from project.testing import EventRecorder
from tasks.demo import create_demo_user
from tasks.tables import syntheses


def test_a_new_profile_gives_a_synthesis(events: EventRecorder, engine: sa.Engine) -> None:
    user = create_demo_user(engine, "grace", datetime(1985, 3, 2, tzinfo=UTC))
    cause = events.publish(ProfileCalculated(module="solar", signs={"sun": "pisces"}), user_id=user, module="solar")
    events.run(only="handlers.synthesis.*")
    done = events.assert_published("synthesis.completed", user_id=user, data={"trigger": "module.profile.calculated"})
    assert done.causation_id == cause
    with engine.connect() as conn:
        trigger = conn.execute(sa.select(syntheses.c.trigger_event_id).where(syntheses.c.user_id == user)).scalar()
    assert str(trigger) == cause


def test_a_version_1_profile_is_upcast_for_the_handler(events: EventRecorder, engine: sa.Engine) -> None:
    user = create_demo_user(engine, "linus", datetime(1969, 12, 28, tzinfo=UTC))
    cause = events.publish(ProfileCalculatedV1(module="solar", sun_sign="capricorn"), user_id=user, module="solar")
    assert events.get(cause).version == 1
    events.run(only="handlers.synthesis.*")
    events.assert_published("synthesis.completed", user_id=user, count=1)
