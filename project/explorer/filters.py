"""What a page asks the record for: the events filter, its keyset cursor, and their parsing.

Times are UTC throughout: a ``datetime-local`` input without a zone is taken as UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from project.patterns import validate_pattern

__all__ = ["Cursor", "EventFilter", "parse_time"]


def parse_time(text: str | None) -> datetime | None:
    """Parse an ISO-8601 time (``2026-11-28T15:20``, with or without a zone; naive is UTC).

    Raises:
        ValueError: ``text`` is not an ISO-8601 time.
    """
    if not text:
        return None
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the events' order, newest first: the (occurred_at, id) of one row."""

    occurred_at: datetime
    id: int

    def encode(self) -> str:
        """The cursor as a URL parameter value."""
        return f"{self.occurred_at.isoformat()}~{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Invert :meth:`encode`.

        Raises:
            ValueError: ``text`` is not a cursor this module wrote.
        """
        at, sep, row_id = text.rpartition("~")
        when = parse_time(at)
        if not sep or when is None:
            raise ValueError(f"not a cursor: {text!r}")
        return cls(when, int(row_id))


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a list shows: every condition given holds.

    ``pattern`` is a subscription pattern (``cosmic.#``: ``*`` one segment, ``#`` zero or
    more); ``failed`` keeps events with a delivery that is ``failed``, ``dead`` or ``rejected``.

    Raises:
        InvalidPattern: ``pattern`` is not a pattern that can match an event name.
        ValueError: ``since`` is not before ``until``.
    """

    pattern: str | None = None
    user_id: str | None = None
    module: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    failed: bool = False

    def __post_init__(self) -> None:
        if self.pattern is not None:
            validate_pattern(self.pattern)
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"the time window is empty: from {self.since.isoformat()} to {self.until.isoformat()}")

    @property
    def active(self) -> bool:
        """Whether any condition is set."""
        return any((self.pattern, self.user_id, self.module, self.since, self.until, self.failed))

    def query_args(self) -> dict[str, str]:
        """The filter as the URL parameters the events page reads."""
        args = {
            "pattern": self.pattern or "",
            "user": self.user_id or "",
            "module": self.module or "",
            "since": _local(self.since),
            "until": _local(self.until),
            "failed": "1" if self.failed else "",
        }
        return {k: v for k, v in args.items() if v}


def _local(value: datetime | None) -> str:
    """The value a ``datetime-local`` input shows for ``value`` (UTC, to the second)."""
    if value is None:
        return ""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
