"""The compact records the log buffer carries to PostgreSQL, encoded and decoded in one place.

Every record is a JSON array whose first element says its kind; the log buffer holds about
``1 + number of handlers`` records per event (the event with its dispatched deliveries, then
one final record per delivery, plus one per retry), each a few hundred bytes:

- ``["e", at, envelope, [[handler, queue], ...]]``: an event and the deliveries the router
  sent for it (their task ids are derived from event_id and handler);
- ``["d", at, event_id, handler, status, attempts, error]``: a delivery's new status.

``at`` is a Unix time in seconds. The router writes event records from inside its Lua
script, so that part of the format is built as text there and in :func:`event_record`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "BufferLengths",
    "DeliveryRecord",
    "EventRecord",
    "decode_record",
    "delivery_record",
    "event_record",
]

_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(value: Any) -> str:
    """Compact JSON: orjson's (a fifth of the standard encoder's time, on every record).

    What orjson refuses is a lone surrogate (in an exception's text, say), which no UTF-8
    write to Redis or PostgreSQL would take either: the standard encoder writes it, and each
    such character becomes ``?``.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _DUMPS(value).encode("utf-8", "replace").decode("utf-8")


class BufferLengths:
    """When a writer of records (the router, a worker process) next reads the log buffer's length.

    The bound (``LOG_BUFFER_MAX_RECORDS``, policy ``shed``) needs the length only near it. A
    buffer found at least :attr:`HEADROOM` records under its bound is not read again for
    ``every_s``; closer to it, it is read before every write. The bound then holds unless more
    than ``HEADROOM`` records are written within that second, and a write costs one command
    (XLEN) less. A bound under ``HEADROOM`` is read every time.
    """

    HEADROOM = 100_000

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._next: dict[str, float] = {}  # log buffer key -> time.monotonic() of its next read

    def due(self, key: str) -> bool:
        """Whether the next write to ``key`` reads its length first."""
        return time.monotonic() >= self._next.get(key, 0.0)

    def read(self, key: str, length: int, bound: int) -> None:
        """Note what a write found: ``key`` held ``length`` records after it."""
        far = 0 <= length <= bound - self.HEADROOM
        self._next[key] = time.monotonic() + self.every_s if far else 0.0


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event the router accepted, and the (handler, queue) of each delivery it sent."""

    at: float
    envelope: dict[str, Any]
    deliveries: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A delivery's new status, as a worker (or the router's reconciler) saw it."""

    at: float
    event_id: str
    handler: str
    status: str
    attempts: int | None
    error: str | None


def event_record(envelope_json: str, deliveries: list[tuple[str, str]], at: float | None = None) -> str:
    """Encode an event record around ``envelope_json``, which must already be valid JSON."""
    when = time.time() if at is None else at
    return f'["e",{when:.6f},{envelope_json},{_dumps([list(d) for d in deliveries])}]'


def delivery_record(
    event_id: str, handler: str, status: str, attempts: int | None, error: str | None = None, at: float | None = None
) -> str:
    """Encode a delivery record."""
    when = time.time() if at is None else at
    return _dumps(["d", round(when, 6), event_id, handler, status, attempts, error[:4000] if error else None])


def decode_record(raw: bytes | str) -> EventRecord | DeliveryRecord:
    """Decode one record; raise ``ValueError`` (or ``TypeError``/``KeyError``) if it is malformed."""
    rec = json.loads(raw)
    if not isinstance(rec, list) or not rec:
        raise ValueError("a record is a non-empty JSON array")
    kind = rec[0]
    if kind == "e" and len(rec) == 4:
        envelope, deliveries = rec[2], rec[3]
        if not isinstance(envelope, dict):
            raise ValueError("event record without an envelope object")
        return EventRecord(float(rec[1]), envelope, [(str(h), str(q)) for h, q in deliveries])
    if kind == "d" and len(rec) == 7:
        attempts = None if rec[5] is None else int(rec[5])
        return DeliveryRecord(float(rec[1]), str(rec[2]), str(rec[3]), str(rec[4]), attempts, rec[6])
    raise ValueError(f"unknown record kind {kind!r} (or wrong length {len(rec)})")
