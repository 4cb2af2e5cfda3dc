"""The lease keeper against the real Redis: renewed a third of the way through, never earlier."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from project.lease import LeaseKeeper, new_token
from tests.conftest import wait_for
from tests.integration.conftest import REDIS_URL


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    keys: list[str] = []
    c.test_keys = keys  # type: ignore[attr-defined]
    yield c
    if keys:
        c.delete(*keys)
    c.close()


def _lease(client: redis.Redis, ttl_ms: int) -> tuple[str, str]:
    key, token = f"test-lease:{uuid.uuid4().hex}", new_token()
    assert client.set(key, token, nx=True, px=ttl_ms)
    client.test_keys.append(key)  # type: ignore[attr-defined]
    return key, token


def test_a_lease_is_not_renewed_before_a_third_of_its_lifetime_then_is_until_released(client: redis.Redis) -> None:
    keeper = LeaseKeeper()
    key, token = _lease(client, 3000)
    time.sleep(0.4)
    keeper.hold(client, key, token, 3000)
    time.sleep(0.2)
    # Taken 0.6 s ago and not renewed yet: a handler shorter than a third of the lease costs
    # no renewal (the keeper used to renew every new lease at once).
    assert client.pttl(key) < 2700
    # Renewed 1 s after it was held: back near its full lifetime.
    wait_for(lambda: client.pttl(key) > 2500, timeout_s=3, interval_s=0.02, what="the renewal")
    assert keeper.release(key) == token
    assert client.pttl(key) <= 3000


def test_a_short_lease_held_while_a_long_one_sleeps_wakes_the_keeper(client: redis.Redis) -> None:
    keeper = LeaseKeeper()
    long_key, long_token = _lease(client, 60_000)
    keeper.hold(client, long_key, long_token, 60_000)  # the keeper now sleeps for ~20 s
    time.sleep(0.1)
    short_key, short_token = _lease(client, 300)
    keeper.hold(client, short_key, short_token, 300)
    time.sleep(1.0)  # more than three times its lifetime: only renewals keep it
    assert client.get(short_key) == short_token.encode()
    keeper.release(short_key)
    wait_for(lambda: not client.exists(short_key), timeout_s=2, what="the released lease to lapse")
    keeper.release(long_key)


def test_a_lease_taken_by_another_holder_is_reported_lost_not_extended(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = LeaseKeeper()
    key, token = _lease(client, 300)
    keeper.hold(client, key, token, 300)
    client.set(key, "someone-else", px=5000)
    wait_for(lambda: "was lost" in caplog.text, timeout_s=3, what="the loss to be logged")
    assert client.pttl(key) <= 5000 and client.get(key) == b"someone-else"
    keeper.release(key)


def test_a_lease_taken_by_another_process_is_adopted_without_a_command_while_fresh(client: redis.Redis) -> None:
    # What a pool process does with the lease its worker's main process took on receipt.
    keeper = LeaseKeeper()
    key, token = _lease(client, 3000)
    time.sleep(0.3)
    assert keeper.adopt(client, key, token, 3000, taken_at=time.monotonic() - 0.3)
    assert client.pttl(key) < 2800  # not renewed: a third of its lifetime has not passed
    assert keeper.token(key) == token
    # Renewed a third of its lifetime after it was taken, not after it was adopted.
    wait_for(lambda: client.pttl(key) > 2800, timeout_s=2, interval_s=0.02, what="the renewal")
    keeper.release(key)


def test_a_lease_adopted_late_is_renewed_first_and_only_if_still_the_takers(client: redis.Redis) -> None:
    keeper = LeaseKeeper()
    key, token = _lease(client, 3000)
    time.sleep(0.3)
    assert keeper.adopt(client, key, token, 3000, taken_at=time.monotonic() - 2.0)  # a third has passed
    assert client.pttl(key) > 2800 and keeper.token(key) == token
    keeper.release(key)
    # Lapsed, and taken by another copy meanwhile: not adopted, not renewed, not held.
    client.set(key, "another-copy", px=5000)
    assert not keeper.adopt(client, key, token, 3000, taken_at=time.monotonic() - 2.0)
    assert client.get(key) == b"another-copy" and client.pttl(key) <= 5000
    assert keeper.token(key) is None
