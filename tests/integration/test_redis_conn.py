"""The worker's raw command paths (``send_one``, ``send_many``) and lease tokens, against the real Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from project.lease import new_token
from project.redis_conn import _packed, send_many, send_one
from tests.integration.conftest import REDIS_URL


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    prefix = f"test-conn:{uuid.uuid4().hex}"
    c.test_prefix = prefix  # type: ignore[attr-defined]
    yield c
    keys = list(c.scan_iter(f"{prefix}:*"))
    if keys:
        c.delete(*keys)
    c.close()


def test_send_many_returns_every_reply_of_one_round_trip(client: redis.Redis) -> None:
    key, stream = f"{client.test_prefix}:k", f"{client.test_prefix}:s"  # type: ignore[attr-defined]
    replies = send_many(client, ("SET", key, "done", "EX", 60), ("XADD", stream, "*", "r", "record"))
    assert replies[0] in (b"OK", "OK")
    assert client.get(key) == b"done"
    assert 0 < client.ttl(key) <= 60
    (entry,) = client.xrange(stream)
    assert entry[0] == replies[1]
    assert entry[1] == {b"r": b"record"}


def test_send_many_raises_the_first_error_reply_and_leaves_the_connection_in_step(client: redis.Redis) -> None:
    key, wrong = f"{client.test_prefix}:k", f"{client.test_prefix}:list"  # type: ignore[attr-defined]
    client.rpush(wrong, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        send_many(client, ("XADD", wrong, "*", "r", "record"), ("SET", key, "after"))
    # A pipeline without a transaction: the command after the error still ran.
    assert client.get(key) == b"after"
    # Every reply was read: the pooled connection answers the next command with its own reply.
    for n in range(5):
        assert send_one(client, "ECHO", f"n{n}") == f"n{n}".encode()
        assert send_many(client, ("ECHO", "a"), ("ECHO", "b")) == [b"a", b"b"]


def test_send_many_sends_again_on_a_connection_the_server_closed(client: redis.Redis) -> None:
    key = f"{client.test_prefix}:k"  # type: ignore[attr-defined]
    assert send_many(client, ("SET", key, "1"), ("CLIENT", "ID"))[0] in (b"OK", "OK")
    (own_id,) = send_many(client, ("CLIENT", "ID"))
    killer = redis.Redis.from_url(REDIS_URL)
    try:
        assert killer.client_kill_filter(_id=own_id) == 1
    finally:
        killer.close()
    # The pooled connection is dead; the call reconnects and sends both commands again.
    assert send_many(client, ("INCR", key), ("GET", key)) == [2, b"2"]


class _TimeLimit(BaseException):  # as Celery's SoftTimeLimitExceeded, raised by a signal handler
    pass


def _raise_time_limit(signum: int, frame: object) -> None:
    raise _TimeLimit()


@pytest.mark.parametrize("many", [False, True])
def test_a_call_cut_short_by_a_time_limit_leaves_no_reply_for_the_next_command(client: redis.Redis, many: bool) -> None:
    key = f"{client.test_prefix}:empty"  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGALRM, _raise_time_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_TimeLimit):  # BLPOP answers (nil) after 1 s: the call is cut short first
            if many:
                send_many(client, ("ECHO", "before"), ("BLPOP", key, 1))
            else:
                send_one(client, "BLPOP", key, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The connection went back to the pool closed (redis-py's read_response disconnects on
    # any BaseException): the next command gets its own reply, not the BLPOP's late nil.
    assert send_one(client, "ECHO", "after") == b"after"
    assert send_many(client, ("ECHO", "a"), ("ECHO", "b")) == [b"a", b"b"]


def test_send_one_does_its_meanwhile_work_while_the_command_is_in_flight(client: redis.Redis) -> None:
    key = f"{client.test_prefix}:k"  # type: ignore[attr-defined]
    seen: list[bytes | None] = []
    other = redis.Redis.from_url(REDIS_URL)

    def meanwhile() -> None:  # the command is sent: another connection sees what it did
        deadline = time.monotonic() + 5
        while other.get(key) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.append(other.get(key))

    try:
        assert send_one(client, "SET", key, "v", meanwhile=meanwhile) in (b"OK", "OK")
    finally:
        other.close()
    assert seen == [b"v"]
    # The reply was read after the work: the connection is in step.
    assert send_one(client, "ECHO", "next") == b"next"


def test_meanwhile_work_that_fails_is_logged_and_the_command_answers(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"{client.test_prefix}:k"  # type: ignore[attr-defined]

    def meanwhile() -> None:
        raise ValueError("a bug in the work")

    assert send_one(client, "INCR", key, meanwhile=meanwhile) == 1
    assert "in flight failed" in caplog.text and "a bug in the work" in caplog.text
    assert send_one(client, "ECHO", "next") == b"next"


def test_meanwhile_work_cut_short_leaves_no_reply_for_the_next_command(client: redis.Redis) -> None:
    key = f"{client.test_prefix}:k"  # type: ignore[attr-defined]

    def meanwhile() -> None:
        raise _TimeLimit()  # as a time limit's signal handler would, while the work runs

    with pytest.raises(_TimeLimit):
        send_one(client, "INCR", key, meanwhile=meanwhile)
    assert client.get(key) == b"1"  # sent, and done: only its reply was never read
    for n in range(3):
        assert send_one(client, "ECHO", f"n{n}") == f"n{n}".encode()


def test_send_one_opens_again_a_connection_at_hand_that_the_server_closed(client: redis.Redis) -> None:
    own_id = send_one(client, "CLIENT", "ID")
    assert send_one(client, "CLIENT", "ID") == own_id  # kept at hand between calls
    killer = redis.Redis.from_url(REDIS_URL)
    try:
        assert killer.client_kill_filter(_id=own_id) == 1
    finally:
        killer.close()
    # The client has no retries (redis-py's default): the dead socket is found before the
    # command is sent on it, so the call does not spend its one attempt there.
    probe = client.connection_pool.get_connection()
    assert probe.retry.get_retries() == 0
    client.connection_pool.release(probe)
    assert send_one(client, "ECHO", "after") == b"after"
    assert send_one(client, "CLIENT", "ID") != own_id


def test_a_forked_child_sends_on_connections_of_its_own(client: redis.Redis) -> None:
    parent_id = send_one(client, "CLIENT", "ID")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the parent's connection at hand is not the child's to use
        try:
            child_id = send_one(client, "CLIENT", "ID")
            echoed = send_many(client, ("ECHO", "child"), ("CLIENT", "ID"))
            os.write(write, f"{child_id} {echoed[0].decode()} {echoed[1]}".encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child_id, echoed, again = os.read(read, 200).decode().split()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert int(child_id) != parent_id and echoed == "child" and int(again) == int(child_id)
    # The child's exit closed its copy of the socket only: the parent's connection goes on.
    assert send_one(client, "CLIENT", "ID") == parent_id
    assert send_one(client, "ECHO", "parent") == b"parent"


def test_threads_sending_at_once_each_read_their_own_replies(client: redis.Redis) -> None:
    wrong: list[tuple[bytes, bytes]] = []
    start = threading.Barrier(8)

    def sender(n: int) -> None:
        start.wait()
        for i in range(300):
            sent = f"t{n}-{i}".encode()
            got = send_one(client, "ECHO", sent) if i % 2 else send_many(client, ("ECHO", sent))[0]
            if got != sent:
                wrong.append((sent, got))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    # However many threads sent at once, a few connections are kept out of the pool, no more.
    in_use = len(client.connection_pool._in_use_connections)  # type: ignore[attr-defined]
    assert 1 <= in_use <= 4


def test_a_small_pool_keeps_no_connection_out_of_its_reach() -> None:
    small = redis.Redis.from_url(REDIS_URL, max_connections=2)
    try:
        assert send_one(small, "ECHO", "x") == b"x"
        assert send_many(small, ("ECHO", "y")) == [b"y"]
        # Both connections the pool allows are still its own to hand out.
        first = small.connection_pool.get_connection()
        second = small.connection_pool.get_connection()
        small.connection_pool.release(first)
        small.connection_pool.release(second)
    finally:
        small.close()


@pytest.mark.parametrize("packer", ["hiredis", "python"])
def test_commands_are_packed_as_redis_py_packs_them(packer: str) -> None:
    options = {}
    if packer == "python":  # what redis-py packs with when hiredis is not installed
        encode = redis.connection.Encoder("utf-8", "strict", False).encode
        options["command_packer"] = redis.connection.PythonRespSerializer(6000, encode)
    conn = redis.Connection(**options)  # type: ignore[arg-type]  # never connected: packing only
    expected = "HiredisRespSerializer" if packer == "hiredis" else "PythonRespSerializer"
    assert type(conn._command_packer).__name__ == expected
    for args in [
        ("EVALSHA", "a" * 40, 2, "stream", "published:é", 86400, '{"e": "ü"}\nchannel'),
        ("SET", b"key", bytearray(b"value"), "PX", 1500),
        ("ECHO", memoryview(b"view")),
        ("INCRBYFLOAT", "k", 0.25),
        ("CLIENT ID",),  # a command name of two words, split by redis-py
        ("CONFIG\tGET", "maxmemory"),  # split at any whitespace
        ("ECHO", "x" * 100_000),
    ]:
        assert b"".join(_packed(conn, args)) == b"".join(bytes(c) for c in conn.pack_command(*args)), args


def test_send_one_and_send_many_take_what_redis_py_takes(client: redis.Redis) -> None:
    key = f"{client.test_prefix}:k"  # type: ignore[attr-defined]
    assert send_one(client, "SET", key, bytearray(b"array")) in (b"OK", "OK")
    assert send_many(client, ("APPEND", key, memoryview(b"+view")), ("GET", key)) == [10, b"array+view"]
    assert send_one(client, "CLIENT INFO").startswith(b"id=")


def test_a_connection_at_hand_that_cannot_connect_tries_as_often_as_its_retry_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    retrying = redis.Redis.from_url(REDIS_URL, retry=Retry(NoBackoff(), 2))
    try:
        assert send_one(retrying, "ECHO", "warm") == b"warm"  # one connection, at hand
        retrying.connection_pool.disconnect()  # closed while at hand (as after a failed call)
        attempts: list[int] = []

        def time_out(self: object) -> None:
            attempts.append(1)
            raise TimeoutError("timed out")  # a host that does not answer (socket.timeout)

        monkeypatch.setattr(redis.connection.Connection, "_connect", time_out)
        with pytest.raises(redis.TimeoutError):
            send_one(retrying, "ECHO", "x")
        # The first try and two retries, as redis-py's pool connects: not a retry of each
        # retry (the send's own connect under the command's Retry).
        assert len(attempts) == 3
        monkeypatch.undo()
        assert send_one(retrying, "ECHO", "back") == b"back"
        assert len(retrying.connection_pool._in_use_connections) == 1  # the same one, at hand
    finally:
        retrying.close()


def test_a_time_limit_while_a_connection_at_hand_is_checked_keeps_the_connection(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert send_one(client, "ECHO", "warm") == b"warm"
    pool = client.connection_pool
    (conn,) = pool._in_use_connections  # type: ignore[attr-defined]

    def cut_short(self: object, *args: object, **kwargs: object) -> bool:
        raise _TimeLimit()  # as Celery's soft time limit, raised by its signal handler

    monkeypatch.setattr(redis.connection.Connection, "can_read", cut_short)
    with pytest.raises(_TimeLimit):
        send_one(client, "ECHO", "x")
    monkeypatch.undo()
    assert send_one(client, "ECHO", "after") == b"after"
    assert pool._in_use_connections == {conn}  # type: ignore[attr-defined]  # back at hand, not lost


def test_a_resp3_pool_keeps_no_connection_at_hand() -> None:
    resp3 = redis.Redis.from_url(REDIS_URL, protocol=3)
    try:
        assert send_one(resp3, "ECHO", "x") == b"x"
        assert send_many(resp3, ("ECHO", "y")) == [b"y"]
        # Its idle connections take pushes (client tracking, maintenance notifications),
        # which the pool keeps and reads: each goes back to it.
        assert len(resp3.connection_pool._in_use_connections) == 0
    finally:
        resp3.close()


def test_a_child_forked_while_a_thread_sets_up_a_pool_is_not_stuck() -> None:
    from project import redis_conn

    read, write = os.pipe()
    with redis_conn._at_hand_lock:  # another thread, setting up a pool's connections at hand
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a child stuck on the lock would be killed, and say nothing
            try:
                fresh = redis.Redis.from_url(REDIS_URL)
                os.write(write, send_one(fresh, "ECHO", "child"))
            finally:
                os._exit(0)
    os.close(write)
    try:
        said = os.read(read, 100)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert said == b"child"


def test_lease_tokens_are_unique_and_name_their_process() -> None:
    tokens = {new_token() for _ in range(10_000)}
    assert len(tokens) == 10_000
    host_pid = next(iter(tokens)).rsplit(":", 1)[0]
    assert host_pid.endswith(f":{os.getpid()}")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child names itself, not the parent it was forked from
        os.write(write, new_token().encode())
        os._exit(0)
    os.close(write)
    try:
        child_token = os.read(read, 200).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert child_token.rsplit(":", 2)[1] == str(pid)
