"""Key names: unchanged in one Redis, a hash tag per scope on a Redis Cluster."""

from __future__ import annotations

from project.keys import Keys
from project.scopes import literal_scopes


def test_in_one_redis_scoped_keys_are_the_keys_of_old() -> None:
    keys = Keys("events")
    assert keys.scoped("user.birth_data.updated") is keys
    assert keys.stream == "events:stream"
    cluster = Keys("events", cluster=True)
    user = cluster.scoped("user.birth_data.updated")
    assert (user.stream, user.log_buffer, user.delivery("t"), user.channel("user.x.y")) == (
        "{events:user}:stream",
        "{events:user}:log",
        "{events:user}:dlv:t",
        "events:user.x.y",
    )
    assert cluster.scope_of_key(user.stream) == "user"
    assert cluster.scope_of_key(user.log_buffer, "log") == "user"
    assert cluster.scope_pattern("log") == "{events:*}:log"
    assert user.beat_lock == cluster.beat_lock == "events:beat:leader"


def test_scopes_named_by_subscriptions_seed_the_routers() -> None:
    assert literal_scopes(["user.*", "cosmic.#", "*.thing.made", "#", "bulk.item.made"]) == {"user", "cosmic", "bulk"}
