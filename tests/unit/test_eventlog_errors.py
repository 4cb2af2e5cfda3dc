"""Only connection-level errors make the log writer wait; any other error is about the records."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest
import redis
import sqlalchemy as sa

from project.eventlog import _is_outage


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("down"),
        redis.ResponseError("LOADING"),
        psycopg2.OperationalError("server closed the connection unexpectedly"),
        psycopg2.InterfaceError("connection already closed"),
        psycopg2.errors.UndefinedTable('relation "events_log" does not exist'),
        sa.exc.OperationalError("connect", {}, psycopg2.OperationalError("refused")),
        sa.exc.ProgrammingError("commit", {}, psycopg2.errors.UndefinedTable("no table")),
        sa.exc.TimeoutError("QueuePool limit reached"),
    ],
    ids=repr,
)
def test_outages(exc: BaseException) -> None:
    assert _is_outage(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("A string literal cannot contain NUL (0x00) characters."),
        psycopg2.DataError("invalid input syntax for type uuid"),
        psycopg2.IntegrityError("violates check constraint"),
        psycopg2.errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
        sa.exc.DataError("insert", {}, psycopg2.DataError("bad")),
        sa.exc.IntegrityError("commit", {}, psycopg2.IntegrityError("bad")),
        TypeError("not a record"),
    ],
    ids=repr,
)
def test_not_outages(exc: BaseException) -> None:
    assert not _is_outage(exc)
