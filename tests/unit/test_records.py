"""The compact records: what is encoded decodes to the same, and every record is valid UTF-8."""

from __future__ import annotations

import pytest

from project.records import DeliveryRecord, EventRecord, decode_record, delivery_record, event_record


def test_an_event_record_round_trips() -> None:
    raw = event_record('{"event_id":"e1","data":{"n":"ünï"}}', [("m.h", "q1"), ("m.g", "q2")], at=1764417600.5)
    rec = decode_record(raw)
    assert rec == EventRecord(1764417600.5, {"event_id": "e1", "data": {"n": "ünï"}}, [("m.h", "q1"), ("m.g", "q2")])


@pytest.mark.parametrize("attempts", [None, 0, 3])
def test_a_delivery_record_round_trips(attempts: int | None) -> None:
    raw = delivery_record("e1", "m.h", "failed", attempts, 'ValueError: ünï \x00 "quoted"', at=1764417600.123456)
    assert decode_record(raw) == DeliveryRecord(
        1764417600.123456, "e1", "m.h", "failed", attempts, 'ValueError: ünï \x00 "quoted"'
    )


def test_an_error_text_with_a_lone_surrogate_is_written_as_utf8_with_a_question_mark() -> None:
    raw = delivery_record("e1", "m.h", "failed", 1, "bad byte \udcff here")
    raw.encode("utf-8")  # what Redis is sent: no UnicodeEncodeError
    rec = decode_record(raw)
    assert isinstance(rec, DeliveryRecord)
    assert rec.error == "bad byte ? here"


def test_a_long_error_is_cut_to_4000_characters() -> None:
    rec = decode_record(delivery_record("e1", "m.h", "dead", 5, "x" * 10_000))
    assert isinstance(rec, DeliveryRecord) and rec.error == "x" * 4000
